"""utils.parallelism: memory accounting counts what a rank really holds, the communication log sees
every collective with the right sizes, the cost model and the pipeline simulator reproduce the
published formulas, and the figures and the planner build."""

import copy
import math

import plotly.graph_objects as go
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils import distributed, parallelism


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def test_tensor_bytes_counts_each_block_of_memory_once():
    flat = torch.zeros(100)
    views = [flat[:40].view(4, 10), flat[40:]]
    assert parallelism.tensor_bytes(views) == 400, "views of one buffer are one buffer"
    assert parallelism.tensor_bytes([flat, torch.zeros(10, dtype=torch.float16)]) == 420
    assert parallelism.tensor_bytes({"a": [flat], "b": 3.0, "c": "text"}) == 400
    assert parallelism.tensor_bytes(views, exclude=flat) == 0
    assert parallelism.tensor_bytes(torch.empty(1000, 1000, device="meta")) == 4_000_000


def test_memory_report_splits_model_states_and_counts_activations():
    model = nn.Linear(10, 10)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    report = parallelism.memory_report(model, optimizer, activations=123)
    assert report.parameters == 110 * 4 and report.gradients == 110 * 4
    assert report.optimizer_state == 2 * 110 * 4 + 2 * 4, "exp_avg, exp_avg_sq and a step counter per tensor"
    assert report.activations == 123 and report.total == sum(report.as_dict().values())
    assert "KiB" in str(report)


def test_memory_report_counts_only_the_local_shard_of_fsdp_parameters():
    def sharded():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = nn.Linear(16, 8)  # 8 x 16 weight, 8 bias
        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        return parallelism.memory_report(model).parameters

    assert distributed.launch(sharded, 4) == [(8 * 16 + 8) // 4 * 4] * 4


def test_saved_activation_bytes_sees_what_backward_keeps():
    block = parallelism.TransformerBlock(d_model=16, n_heads=2)
    fused = parallelism.TransformerBlock(d_model=16, n_heads=2, fused=True)
    fused.load_state_dict(block.state_dict())
    x = torch.randn(2, 32, 16, requires_grad=True)
    out, textbook = parallelism.saved_activation_bytes(block, x, exclude=block)
    torch.testing.assert_close(out, fused(x), atol=1e-5, rtol=1e-5)
    _, flash = parallelism.saved_activation_bytes(fused, x, exclude=fused)
    _, recomputed = parallelism.saved_activation_bytes(
        lambda x: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False), x)
    assert recomputed == x.numel() * 4, "checkpointing keeps only the block's input"
    assert recomputed < flash < textbook
    # Textbook attention keeps the 2 x 2 x 32 x 32 scores (and softmax, mask): quadratic in T.
    x2 = torch.randn(2, 64, 16, requires_grad=True)
    _, longer = parallelism.saved_activation_bytes(block, x2, exclude=block)
    _, longer_flash = parallelism.saved_activation_bytes(fused, x2, exclude=fused)
    assert longer > 2.2 * textbook
    assert longer_flash == pytest.approx(2 * flash, rel=0.01), "fused attention: linear in T"


def test_activation_formula_matches_korthikanti_table_2():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert parallelism.activation_bytes_per_layer(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert parallelism.activation_bytes_per_layer(s, b, h, a, tensor_parallel=t) == \
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert parallelism.activation_bytes_per_layer(s, b, h, a, tensor_parallel=t, sequence_parallel=True,
                                                  recompute="selective") == s * b * h * 34 / t
    assert parallelism.activation_bytes_per_layer(s, b, h, a, recompute="full") == 2 * s * b * h


def test_parameter_counts_on_meta_and_by_formula_agree_with_gpt3():
    assert 174e9 < parallelism.gpt_parameters(96, 12288) < 176e9
    assert 1.2e9 < parallelism.gpt_parameters(24, 2048) < 1.4e9
    counted = parallelism.count_parameters_on_meta(
        lambda: nn.Sequential(*[parallelism.TransformerBlock(512, 8) for _ in range(4)]))
    assert counted == 4 * (12 * 512**2 + 13 * 512)


def test_memory_figure_stacks_categories_per_rank():
    reports = {"DP": [parallelism.MemoryReport(1024, 1024, 2048)] * 2,
               "ZeRO-3": [parallelism.MemoryReport(512, 512, 1024)] * 2}
    fig = parallelism.memory_figure(reports)
    assert isinstance(fig, go.Figure) and len(fig.data) == 4
    assert list(fig.data[0].y) == [1.0, 1.0, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------

def test_comm_log_records_ops_sizes_and_group_sizes():
    def logged():
        pair = dist.new_group([0, 1])
        x = torch.ones(8)
        with parallelism.CommLog() as log:
            dist.all_reduce(x)
            out = torch.empty(2)
            distributed.reduce_scatter_single(out, x)
            distributed.all_gather_single(torch.empty(8), out)
            dist.all_gather([torch.empty(8) for _ in range(4)], x)
            if dist.get_rank() < 2:
                dist.all_reduce(x, group=pair)
            dist.broadcast(x, src=0)
            if dist.get_rank() == 0:
                dist.send(x, dst=1)
            elif dist.get_rank() == 1:
                dist.recv(x, src=0)
            dist.barrier()
        return [(e.op, e.nbytes, e.group_size) for e in log.events], log.bytes_sent(), log.summary()

    events, sent, summary = distributed.launch(logged, 4)[0]
    assert events == [("all_reduce", 32, 4), ("reduce_scatter", 32, 4), ("all_gather", 32, 4),
                      ("all_gather", 128, 4), ("all_reduce", 32, 2), ("broadcast", 32, 4), ("send", 32, 4),
                      ("barrier", 0, 4)]
    assert summary["all_reduce"] == {"calls": 2, "bytes": 64}
    assert sent == pytest.approx(2 * 3 / 4 * 32 + 3 / 4 * 32 + 3 / 4 * 32 + 3 / 4 * 128 + 32 + 32 + 32)


def test_comm_log_sees_the_collectives_of_ddp():
    def ddp():
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(nn.Linear(4, 4))
        with parallelism.CommLog() as log:
            model(torch.randn(2, 4)).sum().backward()
        return [e.op for e in log.events]

    assert distributed.launch(ddp, 2) == [["all_reduce"], ["all_reduce"]]


def test_alpha_beta_model_follows_the_ring_formulas():
    link = parallelism.Interconnect("test", alpha=1e-5, bandwidth=1e9, source="made up")
    n, big_n = 1e9, 8
    assert parallelism.collective_time("all_reduce", n, big_n, link) == pytest.approx(
        2 * 7 * 1e-5 + 2 * 7 / 8 * 1.0)
    assert parallelism.collective_time("reduce_scatter", n, big_n, link) == pytest.approx(7e-5 + 7 / 8)
    assert parallelism.collective_time("all_gather", n, big_n, link) == \
        parallelism.collective_time("reduce_scatter", n, big_n, link)
    assert parallelism.collective_time("send", n, 2, link) == pytest.approx(1e-5 + 1.0)
    assert parallelism.collective_time("all_reduce", n, 1, link) == 0.0
    events = [parallelism.CommEvent("all_reduce", n, big_n), parallelism.CommEvent("send", n, big_n)]
    assert parallelism.modelled_time(events, link) == pytest.approx(2 * 7e-5 + 1.75 + 1e-5 + 1.0)
    with pytest.raises(ValueError):
        parallelism.collective_time("teleport", n, big_n, link)
    for link in parallelism.INTERCONNECTS.values():
        assert link.alpha > 0 and link.bandwidth > 1e9 and "assumed" in link.source


def test_comm_time_figure_and_ring_figure_build():
    fig = parallelism.comm_time_figure({"DP": [parallelism.CommEvent("all_reduce", 1e9, 8)]})
    assert len(fig.data) == len(parallelism.INTERCONNECTS)
    ring = parallelism.ring_allreduce_figure(4)
    assert len(ring.frames) == 1 + 2 * 3
    last = ring.frames[-1].data[0].z
    assert all(value == 4 for row in last for value in row), "after all-gather every rank holds every sum"
    after_reduce_scatter = ring.frames[3].data[0].z
    assert [row.index(4) for row in after_reduce_scatter] == [1, 2, 3, 0], "rank r completes chunk r + 1"


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

def one_f_one_b(stage, n_stages, n_microbatches):
    warmup = min(n_stages - stage - 1, n_microbatches)
    steps = [("F", m) for m in range(warmup)]
    for m in range(warmup, n_microbatches):
        steps += [("F", m), ("B", m - warmup)]
    return steps + [("B", m) for m in range(n_microbatches - warmup, n_microbatches)]


@pytest.mark.parametrize("p,m", [(4, 8), (2, 1), (3, 5), (1, 4), (8, 32)])
def test_simulated_bubble_is_the_published_formula(p, m):
    for schedule in (parallelism.gpipe_schedule, one_f_one_b):
        run = parallelism.simulate_pipeline(schedule, p, m)
        assert run.bubble == pytest.approx(parallelism.bubble_formula(p, m))
        assert run.makespan == pytest.approx((m + p - 1) * 3)
    assert parallelism.simulate_pipeline(parallelism.gpipe_schedule, p, m).peak_in_flight == [m] * p
    assert parallelism.simulate_pipeline(one_f_one_b, p, m).peak_in_flight == [min(p - s, m) for s in range(p)]


def test_simulator_refuses_schedules_that_cannot_run():
    with pytest.raises(parallelism.ScheduleError, match="exactly once"):
        parallelism.simulate_pipeline(lambda s, p, m: [("F", 0)], 2, 1)
    with pytest.raises(parallelism.ScheduleError, match="before F0"):
        parallelism.simulate_pipeline(lambda s, p, m: [("B", 0), ("F", 0)], 2, 1)
    backwards = lambda s, p, m: one_f_one_b(p - 1 - s, p, m)  # noqa: E731 - stages numbered the wrong way
    with pytest.raises(parallelism.ScheduleError, match="deadlock"):
        parallelism.simulate_pipeline(backwards, 4, 8)


def test_communication_time_lengthens_the_pipeline():
    slow = parallelism.simulate_pipeline(parallelism.gpipe_schedule, 4, 8, t_comm=0.5)
    assert slow.makespan > 33 and slow.bubble > parallelism.bubble_formula(4, 8)


def test_gantt_chart_draws_every_step():
    run = parallelism.simulate_pipeline(parallelism.gpipe_schedule, 3, 4)
    fig = parallelism.pipeline_gantt(run)
    assert sum(len(trace.x) for trace in fig.data) == 2 * 3 * 4
    assert "bubble 0.333" in fig.layout.title.text


@pytest.mark.parametrize("schedule", [parallelism.gpipe_schedule, one_f_one_b], ids=["gpipe", "1f1b"])
def test_run_pipeline_equals_the_unsplit_model(schedule):
    def worker(m):
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        stages = [nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(world)]
        whole = copy.deepcopy(nn.Sequential(*stages))
        x, y = torch.randn(3 * m, 5), torch.randn(3 * m, 5)
        out = parallelism.run_pipeline(stages[rank], schedule(rank, world, m), microbatches=x.chunk(m),
                                       targets=y.chunk(m), loss_fn=F.mse_loss, activation_shape=(3, 5))
        loss = F.mse_loss(whole(x), y)
        loss.backward()
        diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(stages[rank].parameters(),
                                                                          whole[rank].parameters()))
        return diff, out["loss"], loss.item(), len(out["events"])

    results = distributed.launch(worker, 3, 4)
    assert all(r[0] < 1e-6 and r[3] == 8 for r in results)
    assert results[-1][1].item() == pytest.approx(results[-1][2], abs=1e-6)
    assert results[0][1] is None
    run = parallelism.measured_run([[(s, "F", 0, 0.0, 0.001)] for s in range(3)], 1)
    assert run.n_stages == 3 and run.makespan == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------

def zero_formula(n_params, world_size, zero_stage):
    return (2 * n_params / (world_size if zero_stage >= 3 else 1) + 2 * n_params / (world_size if zero_stage >= 2 else 1)
            + 12 * n_params / (world_size if zero_stage >= 1 else 1))


def test_plan_3d_is_consistent_with_its_assumptions():
    shape = parallelism.MODEL_SHAPES["175B (GPT-3)"]
    plan = parallelism.plan_3d(zero_formula, **shape, gpus=1024, tensor_parallel=8, pipeline_parallel=16,
                               zero_stage=1, global_batch=1536)
    params = parallelism.gpt_parameters(shape["n_layers"], shape["hidden"])
    assert plan.data_parallel == 8 and plan.n_microbatches == 192
    states = sum(plan.memory[k] for k in ("parameters", "gradients", "optimizer state"))
    assert states == pytest.approx(zero_formula(math.ceil(params / 128), 8, 1))
    assert plan.bubble == pytest.approx(15 / (192 + 15))
    assert plan.time["compute"] == pytest.approx(6 * params * 1536 * 2048 / (1024 * 989e12 * 0.5))
    assert plan.time["pipeline bubble"] == pytest.approx(plan.time["compute"] * 15 / 192)
    assert sum(plan.memory.values()) < 80e9 and not any("NOT fit" in n for n in plan.notes)

    naive = parallelism.plan_3d(zero_formula, **shape, gpus=64, tensor_parallel=1, pipeline_parallel=1, zero_stage=0)
    assert any("NOT fit" in n for n in naive.notes)
    wide = parallelism.plan_3d(zero_formula, **shape, gpus=1024, tensor_parallel=16, pipeline_parallel=8)
    assert any("spans nodes" in n for n in wide.notes)
    impossible = parallelism.plan_3d(zero_formula, **shape, gpus=96, tensor_parallel=8, pipeline_parallel=16)
    assert impossible.data_parallel == 0 and "cannot be split" in impossible.notes[0]


def test_planner_widget_builds_with_and_without_exercise_1():
    widget = parallelism.planner(zero_formula)
    summary = widget.children[1]
    assert "B parameters" in summary.value

    def unfinished(*args):
        raise NotImplementedError()

    assert "Finish exercise 1" in parallelism.planner(unfinished).children[1].value
