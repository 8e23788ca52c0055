"""Phase 7's helpers (utils.memory_accounting, utils.communication, utils.pipeline, utils.plan3d,
re-exported by utils.parallelism): memory accounting counts what a rank really holds, the
communication log sees every collective with the right sizes, the cost model and the pipeline
simulator reproduce the published formulas (GPipe, 1F1B, interleaved 1F1B, ZB-H1), and the figures
and the planner build."""

import copy
import math
import time

import plotly.graph_objects as go
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils import communication, distributed, memory_accounting, parallelism, pipeline, plan3d


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def test_tensor_bytes_counts_each_block_of_memory_once():
    flat = torch.zeros(100)
    views = [flat[:40].view(4, 10), flat[40:]]
    assert memory_accounting.tensor_bytes(views) == 400, "views of one buffer are one buffer"
    assert memory_accounting.tensor_bytes([flat, torch.zeros(10, dtype=torch.float16)]) == 420
    assert memory_accounting.tensor_bytes({"a": [flat], "b": 3.0, "c": "text"}) == 400
    assert memory_accounting.tensor_bytes(views, exclude=flat) == 0
    assert memory_accounting.tensor_bytes(torch.empty(1000, 1000, device="meta")) == 4_000_000


def test_memory_report_splits_model_states_and_counts_activations():
    model = nn.Linear(10, 10)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    report = memory_accounting.memory_report(model, optimizer, activations=123)
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
        return memory_accounting.memory_report(model).parameters

    assert distributed.launch(sharded, 4) == [(8 * 16 + 8) // 4 * 4] * 4


def test_saved_activation_bytes_sees_what_backward_keeps():
    block = memory_accounting.TransformerBlock(d_model=16, n_heads=2)
    fused = memory_accounting.TransformerBlock(d_model=16, n_heads=2, fused=True)
    fused.load_state_dict(block.state_dict())
    x = torch.randn(2, 32, 16, requires_grad=True)
    out, textbook = memory_accounting.saved_activation_bytes(block, x, exclude=block)
    torch.testing.assert_close(out, fused(x), atol=1e-5, rtol=1e-5)
    _, flash = memory_accounting.saved_activation_bytes(fused, x, exclude=fused)
    _, recomputed = memory_accounting.saved_activation_bytes(
        lambda x: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False), x)
    assert recomputed == x.numel() * 4, "checkpointing keeps only the block's input"
    assert recomputed < flash < textbook
    # Textbook attention keeps the 2 x 2 x 32 x 32 scores (and softmax, mask): quadratic in T.
    x2 = torch.randn(2, 64, 16, requires_grad=True)
    _, longer = memory_accounting.saved_activation_bytes(block, x2, exclude=block)
    _, longer_flash = memory_accounting.saved_activation_bytes(fused, x2, exclude=fused)
    assert longer > 2.2 * textbook
    assert longer_flash == pytest.approx(2 * flash, rel=0.01), "fused attention: linear in T"


def test_activation_formula_matches_korthikanti_table_2():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert memory_accounting.activation_bytes_per_layer(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert memory_accounting.activation_bytes_per_layer(s, b, h, a, tensor_parallel=t) == \
        s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert memory_accounting.activation_bytes_per_layer(s, b, h, a, tensor_parallel=t, sequence_parallel=True,
                                                  recompute="selective") == s * b * h * 34 / t
    assert memory_accounting.activation_bytes_per_layer(s, b, h, a, recompute="full") == 2 * s * b * h


def test_parameter_counts_on_meta_and_by_formula_agree_with_gpt3():
    assert 174e9 < memory_accounting.gpt_parameters(96, 12288) < 176e9
    assert 1.2e9 < memory_accounting.gpt_parameters(24, 2048) < 1.4e9
    counted = memory_accounting.count_parameters_on_meta(
        lambda: nn.Sequential(*[memory_accounting.TransformerBlock(512, 8) for _ in range(4)]))
    assert counted == 4 * (12 * 512**2 + 13 * 512)


def test_memory_figure_stacks_categories_per_rank():
    reports = {"DP": [memory_accounting.MemoryReport(1024, 1024, 2048)] * 2,
               "ZeRO-3": [memory_accounting.MemoryReport(512, 512, 1024)] * 2}
    fig = memory_accounting.memory_figure(reports)
    assert isinstance(fig, go.Figure) and len(fig.data) == 4
    assert list(fig.data[0].y) == [1.0, 1.0, 0.5, 0.5]
    with_peaks = memory_accounting.memory_figure(reports, peaks={"DP": [5120, 5120], "ZeRO-3": [3072, 3072]})
    assert len(with_peaks.data) == 5 and list(with_peaks.data[-1].y) == [5.0, 5.0, 3.0, 3.0]


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------

def test_comm_log_records_ops_sizes_and_group_sizes():
    def logged():
        pair = dist.new_group([0, 1])
        x = torch.ones(8)
        with communication.CommLog() as log:
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
        with communication.CommLog() as log:
            model(torch.randn(2, 4)).sum().backward()
        return [e.op for e in log.events]

    assert distributed.launch(ddp, 2) == [["all_reduce"], ["all_reduce"]]


def test_alpha_beta_model_follows_the_ring_formulas():
    link = communication.Interconnect("test", alpha=1e-5, bandwidth=1e9, source="made up")
    n, big_n = 1e9, 8
    assert communication.collective_time("all_reduce", n, big_n, link) == pytest.approx(
        2 * 7 * 1e-5 + 2 * 7 / 8 * 1.0)
    assert communication.collective_time("reduce_scatter", n, big_n, link) == pytest.approx(7e-5 + 7 / 8)
    assert communication.collective_time("all_gather", n, big_n, link) == \
        communication.collective_time("reduce_scatter", n, big_n, link)
    assert communication.collective_time("send", n, 2, link) == pytest.approx(1e-5 + 1.0)
    assert communication.collective_time("all_reduce", n, 1, link) == 0.0
    events = [communication.CommEvent("all_reduce", n, big_n), communication.CommEvent("send", n, big_n)]
    assert communication.modelled_time(events, link) == pytest.approx(2 * 7e-5 + 1.75 + 1e-5 + 1.0)
    with pytest.raises(ValueError):
        communication.collective_time("teleport", n, big_n, link)
    for link in communication.INTERCONNECTS.values():
        assert link.alpha > 0 and link.bandwidth > 1e9 and "assumed" in link.source


def test_comm_time_figure_and_ring_figure_build():
    fig = communication.comm_time_figure({"DP": [communication.CommEvent("all_reduce", 1e9, 8)]})
    assert len(fig.data) == len(communication.INTERCONNECTS)
    ring = communication.ring_allreduce_figure(4)
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
    for schedule in (pipeline.gpipe_schedule, one_f_one_b):
        run = pipeline.simulate_pipeline(schedule, p, m)
        assert run.bubble == pytest.approx(pipeline.bubble_formula(p, m))
        assert run.makespan == pytest.approx((m + p - 1) * 3)
    assert pipeline.simulate_pipeline(pipeline.gpipe_schedule, p, m).peak_in_flight == [m] * p
    assert pipeline.simulate_pipeline(one_f_one_b, p, m).peak_in_flight == [min(p - s, m) for s in range(p)]


def test_simulator_refuses_schedules_that_cannot_run():
    with pytest.raises(pipeline.ScheduleError, match="exactly once"):
        pipeline.simulate_pipeline(lambda s, p, m: [("F", 0)], 2, 1)
    with pytest.raises(pipeline.ScheduleError, match="before F0"):
        pipeline.simulate_pipeline(lambda s, p, m: [("B", 0), ("F", 0)], 2, 1)
    backwards = lambda s, p, m: one_f_one_b(p - 1 - s, p, m)  # noqa: E731 - stages numbered the wrong way
    with pytest.raises(pipeline.ScheduleError, match="deadlock"):
        pipeline.simulate_pipeline(backwards, 4, 8)


def test_communication_time_lengthens_the_pipeline():
    slow = pipeline.simulate_pipeline(pipeline.gpipe_schedule, 4, 8, t_comm=0.5)
    assert slow.makespan > 33 and slow.bubble > pipeline.bubble_formula(4, 8)


def test_gantt_chart_draws_every_step():
    run = pipeline.simulate_pipeline(pipeline.gpipe_schedule, 3, 4)
    fig = pipeline.pipeline_gantt(run)
    assert sum(len(trace.x) for trace in fig.data) == 2 * 3 * 4
    assert "bubble 0.333" in fig.layout.title.text


@pytest.mark.parametrize("schedule", [pipeline.gpipe_schedule, one_f_one_b], ids=["gpipe", "1f1b"])
def test_run_pipeline_equals_the_unsplit_model(schedule):
    def worker(m):
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(0)
        stages = [nn.Sequential(nn.Linear(5, 5), nn.Tanh()) for _ in range(world)]
        whole = copy.deepcopy(nn.Sequential(*stages))
        x, y = torch.randn(3 * m, 5), torch.randn(3 * m, 5)
        out = pipeline.run_pipeline(stages[rank], schedule(rank, world, m), microbatches=x.chunk(m),
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
    run = pipeline.measured_run([[(s, "F", 0, 0.0, 0.001)] for s in range(3)], 1)
    assert run.n_stages == 3 and run.makespan == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------

def zero_formula(n_params, world_size, zero_stage):
    return (2 * n_params / (world_size if zero_stage >= 3 else 1) + 2 * n_params / (world_size if zero_stage >= 2 else 1)
            + 12 * n_params / (world_size if zero_stage >= 1 else 1))


def test_plan_3d_is_consistent_with_its_assumptions():
    shape = plan3d.MODEL_SHAPES["175B (GPT-3)"]
    plan = plan3d.plan_3d(zero_formula, **shape, gpus=1024, tensor_parallel=8, pipeline_parallel=16,
                               zero_stage=1, global_batch=1536)
    params = memory_accounting.gpt_parameters(shape["n_layers"], shape["hidden"])
    embedding = (50257 + 2048) * shape["hidden"]
    first_stage = math.ceil((params - embedding) / 16 / 8 + embedding / 8)   # 6 layers and the embeddings, over t
    assert plan.data_parallel == 8 and plan.n_microbatches == 192
    states = sum(plan.memory[k] for k in ("parameters", "gradients", "optimizer state"))
    assert states == pytest.approx(zero_formula(first_stage, 8, 1))
    assert plan.bubble == pytest.approx(15 / (192 + 15))
    assert plan.time["compute"] == pytest.approx(6 * params * 1536 * 2048 / (1024 * 989e12 * 0.5))
    assert plan.time["pipeline bubble"] == pytest.approx(plan.time["compute"] * 15 / 192)
    assert sum(plan.memory.values()) < 80e9 and not any("NOT fit" in n for n in plan.notes)

    naive = plan3d.plan_3d(zero_formula, **shape, gpus=64, tensor_parallel=1, pipeline_parallel=1, zero_stage=0)
    assert any("NOT fit" in n for n in naive.notes)
    wide = plan3d.plan_3d(zero_formula, **shape, gpus=1024, tensor_parallel=16, pipeline_parallel=8)
    assert any("spans nodes" in n for n in wide.notes)
    impossible = plan3d.plan_3d(zero_formula, **shape, gpus=96, tensor_parallel=8, pipeline_parallel=16)
    assert impossible.data_parallel == 0 and "cannot be split" in impossible.notes[0]


def test_plan_3d_splits_model_states_per_category_for_each_zero_stage():
    """13B on 64 GPUs without TP or PP: ZeRO-1 shards only the 12 bytes of optimizer state."""
    shape = plan3d.MODEL_SHAPES["13B (GPT-3)"]
    psi = memory_accounting.gpt_parameters(shape["n_layers"], shape["hidden"])
    expected = {0: (2, 2, 12), 1: (2, 2, 12 / 64), 2: (2, 2 / 64, 12 / 64), 3: (2 / 64, 2 / 64, 12 / 64)}
    for stage, per_param in expected.items():
        plan = plan3d.plan_3d(zero_formula, **shape, gpus=64, tensor_parallel=1, pipeline_parallel=1,
                                   zero_stage=stage)
        got = [plan.memory[k] for k in ("parameters", "gradients", "optimizer state")]
        assert got == pytest.approx([b * psi for b in per_param], rel=1e-6), stage
        assert not any("check exercise 1" in n for n in plan.notes)
    assert memory_accounting.model_state_categories(7.5e9, 64, 1) == pytest.approx(
        {"parameters": 15e9, "gradients": 15e9, "optimizer state": 90e9 / 64})
    wrong = plan3d.plan_3d(lambda n, w, s: 16 * n, **shape, gpus=64, tensor_parallel=1, pipeline_parallel=1,
                                zero_stage=3)
    assert any("check exercise 1" in n for n in wrong.notes), "a wrong exercise 1 is pointed out"


def test_175b_on_64_gpus_fits_only_with_zero3_and_full_recomputation():
    shape = plan3d.MODEL_SHAPES["175B (GPT-3)"]

    def total(stage, recompute):
        plan = plan3d.plan_3d(zero_formula, **shape, gpus=64, tensor_parallel=1, pipeline_parallel=1,
                                   zero_stage=stage, recompute=recompute)
        return sum(plan.memory.values()), plan

    for stage in range(3):
        for recompute in ("none", "selective", "full"):
            assert total(stage, recompute)[0] > 80e9
    assert total(3, "selective")[0] > 80e9
    fits, plan = total(3, "full")
    assert 45e9 < fits < 52e9
    assert any("ZeRO-3 communicates for each of the 8 microbatches" in n for n in plan.notes)


def test_zero_2_and_3_pay_their_communication_per_microbatch():
    shape = plan3d.MODEL_SHAPES["13B (GPT-3)"]

    def dp_time(stage, global_batch):
        return plan3d.plan_3d(zero_formula, **shape, gpus=64, tensor_parallel=4, pipeline_parallel=4,
                                   zero_stage=stage, global_batch=global_batch).time["data-parallel comm."]

    assert dp_time(0, 64) == dp_time(1, 64) == dp_time(1, 256)        # one all-reduce per step
    assert dp_time(3, 256) == pytest.approx(4 * dp_time(3, 64), rel=1e-6)   # 4x the microbatches
    assert dp_time(3, 64) == pytest.approx(16 * 1.5 * dp_time(1, 64), rel=0.05)  # d = 4, m = 16: 1.5 all-reduces each
    assert dp_time(1, 64) < dp_time(2, 64) < dp_time(3, 64)


def test_peak_memory_sees_what_exists_during_the_step_only():
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64))
    x = torch.randn(8, 64)
    params = sum(p.numel() for p in model.parameters()) * 4
    with memory_accounting.PeakMemory(model, x) as peak:
        hidden = model[1](model[0](x))
        del hidden
        big = torch.zeros(1000, 1000)
        del big
    assert peak.start == params + x.numel() * 4
    assert peak.peak >= peak.start + 4_000_000, "the 4 MB temporary counts while it exists"
    assert peak.end == peak.start, "freed tensors no longer count"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with memory_accounting.PeakMemory(model, optimizer, x) as step:
        model(x).sum().backward()
        optimizer.step()
    assert step.end >= step.start + 2 * params, "gradients and momentum stay"
    assert step.peak >= step.end


def test_planner_widget_builds_with_and_without_exercise_1():
    widget = plan3d.planner(zero_formula)
    summary = widget.children[1]
    assert "B parameters" in summary.value

    def unfinished(*args):
        raise NotImplementedError()

    assert "Finish exercise 1" in plan3d.planner(unfinished).children[1].value


# ---------------------------------------------------------------------------------------------
# Measuring the network
# ---------------------------------------------------------------------------------------------

def test_fit_alpha_beta_recovers_the_model_it_fits():
    link = communication.Interconnect("test", 30e-6, 2e9, "made up")
    sizes = [2**k for k in range(10, 24, 2)]
    for op, world in (("all_reduce", 2), ("all_reduce", 4), ("all_gather", 3)):
        seconds = [communication.collective_time(op, n, world, link) for n in sizes]
        fitted = communication.fit_alpha_beta(op, sizes, seconds, world)
        assert fitted.alpha == pytest.approx(link.alpha, rel=1e-6)
        assert fitted.bandwidth == pytest.approx(link.bandwidth, rel=1e-6)


def test_fit_alpha_beta_keeps_both_terms_non_negative_on_noisy_times():
    sizes = [1024, 4096, 16384, 65536]
    flat = communication.fit_alpha_beta("all_reduce", sizes, [1e-3, 0.9e-3, 0.95e-3, 0.8e-3], 2)  # falls with size
    assert flat.alpha > 0 and flat.bandwidth == math.inf
    through_zero = communication.fit_alpha_beta("all_reduce", sizes, [n / 1e9 * 1.3 for n in sizes], 2)
    assert through_zero.alpha >= 0 and through_zero.bandwidth == pytest.approx(1e9 / 1.3, rel=0.05)


def test_time_collective_measures_every_size_on_every_rank():
    sizes = [1024, 1 << 16]
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        results = distributed.launch(communication.time_collective, 2, op, sizes, kwargs={"repeats": 2}, timeout=60)
        assert len(results) == 2 and all(len(r) == 2 and all(t > 0 for t in r) for r in results)
        assert results[0] == results[1], "every rank reports the slowest rank's time"
    with pytest.raises(distributed.RankError, match="cannot time"):
        distributed.launch(communication.time_collective, 2, "broadcast", sizes, timeout=30)


def test_comm_events_carry_the_moment_of_the_call_and_the_overlap_figure_builds():
    def logged():
        before = time.perf_counter()
        with communication.CommLog() as log:
            dist.all_reduce(torch.ones(4))
        return before <= log.events[0].at <= time.perf_counter()

    assert distributed.launch(logged, 2) == [True, True]
    fig = communication.overlap_figure({"one bucket per layer": ([(1, 0.0, 1.0), (0, 1.0, 2.0)], [1.0, 2.0], 2.1, 2.5)})
    assert len(fig.data) == 3 and list(fig.data[0].x) == [1.0, 1.0]


@pytest.mark.parametrize("p,m,v", [(4, 8, 2), (4, 16, 3), (2, 4, 4), (8, 16, 2)])
def test_interleaved_1f1b_divides_the_bubble_by_the_number_of_chunks(p, m, v):
    import functools
    schedule = functools.partial(pipeline.interleaved_1f1b_schedule, chunks=v)
    run = pipeline.simulate_pipeline(schedule, p, m, chunks=v)
    plain = pipeline.simulate_pipeline(one_f_one_b, p, m)
    assert run.bubble == pytest.approx(pipeline.bubble_formula(p, m, v), abs=1e-9)
    assert run.bubble < plain.bubble and run.makespan < plain.makespan
    assert run.peak_in_flight[0] / v > plain.peak_in_flight[0], "more activations in flight: the price"
    assert all(len(step) == 3 for step in schedule(0, p, m))
    assert "2 chunks" in pipeline.pipeline_gantt(
        pipeline.simulate_pipeline(functools.partial(pipeline.interleaved_1f1b_schedule, chunks=2), 4, 8,
                                      chunks=2)).layout.title.text
    with pytest.raises(ValueError, match="multiple"):
        pipeline.interleaved_1f1b_schedule(0, 4, 6)


def test_a_chunked_schedule_that_cannot_run_is_refused():
    def backwards_first(stage, n_stages, n_microbatches):   # chunk 1 before chunk 0: waits forever
        return [(k, m, c) for c in (1, 0) for m in range(n_microbatches) for k in ("F", "B")]

    with pytest.raises(pipeline.ScheduleError, match="deadlock"):
        pipeline.simulate_pipeline(backwards_first, 2, 2, chunks=2)
    with pytest.raises(pipeline.ScheduleError, match="for each of its 2 chunks"):
        pipeline.simulate_pipeline(pipeline.gpipe_schedule, 2, 2, chunks=2)


def test_interleaved_bubble_is_p_minus_1_over_v_m_of_the_ideal_compute():
    """Narayanan et al. 2021, section 2.2: the bubble time over the ideal compute time is (p-1)/(v m)."""
    import functools
    for p, m, v in ((4, 8, 2), (4, 16, 4), (8, 32, 2), (2, 6, 3)):
        for t_f, t_b in ((1.0, 2.0), (1.0, 1.0)):
            run = pipeline.simulate_pipeline(functools.partial(pipeline.interleaved_1f1b_schedule, chunks=v), p, m,
                                             t_forward=t_f, t_backward=t_b, chunks=v)
            ideal = m * (t_f + t_b)
            assert (run.makespan - ideal) / ideal == pytest.approx((p - 1) / (v * m), abs=1e-9)


def test_zero_bubble_h1_idles_a_third_of_1f1b_with_the_same_peak_memory():
    """Qi et al. 2024, section 2: idle time per stage (p-1)(T_F + T_B + T_W) for 1F1B and
    (p-1)(T_F + T_B - T_W) for ZB-H1 (m >= p); with T_F = T_B = T_W a third."""
    for p, m in ((4, 8), (4, 4), (3, 7), (5, 12), (8, 32), (2, 5)):
        for t_f, t_b, t_w in ((1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (2.0, 2.0, 1.0), (1.0, 2.0, 1.0)):
            zb = pipeline.simulate_pipeline(pipeline.zero_bubble_h1_schedule, p, m, t_forward=t_f,
                                            t_backward=t_b + t_w, t_weight=t_w)
            plain = pipeline.simulate_pipeline(one_f_one_b, p, m, t_forward=t_f, t_backward=t_b + t_w)
            ideal = m * (t_f + t_b + t_w)
            assert plain.makespan - ideal == pytest.approx((p - 1) * (t_f + t_b + t_w))
            assert zb.makespan - ideal == pytest.approx((p - 1) * (t_f + t_b - t_w)), (p, m, t_f, t_b, t_w)
            if t_f == t_b == t_w:
                assert (zb.makespan - ideal) * 3 == pytest.approx(plain.makespan - ideal)
            # a microbatch's activations live from its F to its W: p on every stage, 1F1B's first-stage peak
            assert zb.peak_in_flight == [p] * p and max(zb.peak_in_flight) == max(plain.peak_in_flight)
    # fewer microbatches than stages: still runs, never slower than 1F1B
    for p, m in ((4, 2), (3, 1)):
        zb = pipeline.simulate_pipeline(pipeline.zero_bubble_h1_schedule, p, m)
        assert zb.makespan <= pipeline.simulate_pipeline(one_f_one_b, p, m).makespan
        assert zb.peak_in_flight == [m] * p


def test_zero_bubble_h1_is_1f1b_with_its_weight_gradients_moved():
    for p, m in ((4, 8), (3, 2), (1, 3)):
        for stage in range(p):
            steps = pipeline.zero_bubble_h1_schedule(stage, p, m)
            assert [st for st in steps if st[0] != "W"] == one_f_one_b(stage, p, m)
            # stage s holds back its first s weight gradients; every W follows its own B
            assert [st[1] for st in steps if st[0] == "W"] == list(range(m))
            first_w = steps.index(("W", 0))
            assert sum(st[0] == "B" for st in steps[:first_w]) == min(stage + 1, m)


def test_simulator_checks_the_weight_gradient_steps():
    with pytest.raises(pipeline.ScheduleError, match="W0 before B0"):
        pipeline.simulate_pipeline(lambda s, p, m: [("F", 0), ("W", 0), ("B", 0)], 2, 1)
    with pytest.raises(pipeline.ScheduleError, match="F and B and W"):
        pipeline.simulate_pipeline(lambda s, p, m: [("F", 0), ("B", 0), ("W", 0), ("F", 1), ("B", 1)], 1, 2)
    with pytest.raises(ValueError, match="t_weight"):
        pipeline.simulate_pipeline(pipeline.zero_bubble_h1_schedule, 2, 2, t_weight=3.0)
    # A W waits for nothing but its own B, and B gets the rest of the backward time.
    run = pipeline.simulate_pipeline(pipeline.zero_bubble_h1_schedule, 1, 1, t_forward=1.0, t_backward=3.0,
                                     t_weight=1.0)
    assert [(kind, end - start) for _, kind, _, start, end in run.events] == [("F", 1.0), ("B", 2.0), ("W", 1.0)]
    fig = pipeline.pipeline_gantt(pipeline.simulate_pipeline(pipeline.zero_bubble_h1_schedule, 4, 8))
    assert [trace.name for trace in fig.data] == ["forward", "backward, input gradient", "backward, weight gradient"]
    assert sum(len(trace.x) for trace in fig.data) == 3 * 4 * 8 and "bubble 0.111" in fig.layout.title.text


def test_the_old_module_name_re_exports_every_helper():
    modules = (memory_accounting, communication, pipeline, plan3d)
    names = [name for module in modules for name in module.__all__]
    assert len(names) == len(set(names)), "a name defined in two modules"
    for module in modules:
        for name in module.__all__:
            assert getattr(parallelism, name) is getattr(module, name)
    assert sorted(parallelism.__all__) == sorted(names)
