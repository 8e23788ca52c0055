"""Measure Phase 7's launcher and simulator and print the figures (`make benchmark` runs it).

    .venv/bin/python tests/benchmark_parallelism.py

Target: launching 4 ranks from a notebook takes <= 1 s. Also printed: the network of this machine
(alpha and beta fitted to measured gloo all-reduces), DDP's backward pass with small and with one
big bucket (the overlap), what the simulator reproduces (the pipeline bubble of GPipe, 1F1B,
interleaved 1F1B and ZB-H1) and modelled times. The notebook's run time and its autograding time are
measured with every phase's by tests/benchmark.py. These are measurements to read, not assertions:
timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from machine import describe  # noqa: E402
# Exercises 1 and 6 of the notebook, written independently for the tests.
from test_utils_parallelism import one_f_one_b, zero_formula  # noqa: E402
from utils import communication, distributed, pipeline, plan3d  # noqa: E402


def rank_id():
    return dist.get_rank()


def all_reduce_once():
    x = torch.ones(1024)
    dist.all_reduce(x)
    return x[0].item()


def launch_times(world_size: int, fn, repeats: int, **kwargs) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        distributed.launch(fn, world_size, **kwargs)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    print(describe())
    backend, start = distributed.choose_backend(4)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"backend for 4 ranks: {backend} ({start}); GPUs: {gpus}"
          + ("" if backend == "nccl" else " -- the NCCL path was not exercised on this machine"))

    torch.ones(256, 256) @ torch.ones(256, 256)  # a parent that already ran threaded maths, like a notebook
    print("\nLaunching ranks (median of 10, seconds; target: 4 ranks <= 1 s)")
    for world in (2, 4, 8):
        times = launch_times(world, rank_id, 10)
        print(f"  fork, {world} ranks, empty worker:      median {statistics.median(times):.3f}, max {max(times):.3f}")
    times = launch_times(4, all_reduce_once, 10)
    print(f"  fork, 4 ranks, one all-reduce:      median {statistics.median(times):.3f}, max {max(times):.3f}")
    times = launch_times(2, rank_id, 2, start_method="spawn", timeout=120)
    print(f"  spawn, 2 ranks (what NCCL uses):    median {statistics.median(times):.3f}")
    start_time = time.perf_counter()
    try:
        distributed.launch(_deadlock, 2, timeout=2)
    except distributed.LaunchTimeout:
        pass
    print(f"  a deadlock with timeout=2 s ends after {time.perf_counter() - start_time:.2f} s")

    print("\nThe network of this machine: gloo all-reduce between CPU processes, alpha and beta fitted")
    sizes = [2**k for k in range(10, 25, 2)]
    for world in (2, 4):
        seconds = distributed.launch(communication.time_collective, world, "all_reduce", sizes, timeout=300)[0]
        fitted = communication.fit_alpha_beta("all_reduce", sizes, seconds, world)
        print(f"  {world} ranks: alpha = {fitted.alpha * 1e6:7.1f} us, beta = {fitted.bandwidth / 1e9:6.2f} GB/s "
              f"(measured 1 KiB: {seconds[0] * 1e6:.0f} us, 16 MiB: {seconds[-1] * 1e3:.1f} ms)")

    print("\nOverlap: DDP's backward + gradient averaging, 2 ranks, 8 layers of 512 x 512 (median of 5 steps, ms)")
    for name, cap_mb in (("a bucket per layer (1 MiB)", 1.01), ("one bucket for the model", 1000.0)):
        times = distributed.launch(_ddp_step_times, 2, cap_mb, timeout=300)[0]
        print(f"  {name:28s} {statistics.median(times):7.1f}")

    print("\nPipeline simulator (p = 4 stages, m = 8 microbatches, backward = 2 x forward; ZB-H1: B = W = forward)")
    interleaved = functools.partial(pipeline.interleaved_1f1b_schedule, chunks=2)
    for name, schedule, chunks, formula in (
            ("GPipe", pipeline.gpipe_schedule, 1, "(p-1)/(m+p-1)"),
            ("1F1B", one_f_one_b, 1, "(p-1)/(m+p-1)"),
            ("interleaved 1F1B, v = 2", interleaved, 2, "(p-1)/(vm+p-1)"),
            ("ZB-H1", pipeline.zero_bubble_h1_schedule, 1, "(p-1)/(3m+p-1)")):
        run = pipeline.simulate_pipeline(schedule, 4, 8, chunks=chunks)
        # ZB-H1 (Qi et al. 2024): idle (p-1)(T_F + T_B - T_W) = (p-1) T per stage, over a step of 3 m T + that
        expected = (4 - 1) / (3 * 8 + 4 - 1) if name == "ZB-H1" else pipeline.bubble_formula(4, 8, chunks)
        print(f"  {name:24s} bubble {run.bubble:.4f} ({formula} = {expected:.4f}), "
              f"activations held per stage {run.peak_in_flight}" + (" (chunk-microbatches)" if chunks > 1 else ""))

    print("\nModelled all-reduce of 15 GB of gradients (a 7.5B model in bf16) on 64 GPUs, ring algorithm")
    for name, link in communication.INTERCONNECTS.items():
        print(f"  {name:42s} {communication.collective_time('all_reduce', 15e9, 64, link):7.3f} s (modelled)")
    shape = plan3d.MODEL_SHAPES["175B (GPT-3)"]
    plan = plan3d.plan_3d(zero_formula, **shape, gpus=1024, tensor_parallel=8, pipeline_parallel=16,
                               zero_stage=1, global_batch=1536)
    print(f"  planner, 175B on 1024 GPUs (t=8, p=16, d={plan.data_parallel}): "
          f"{sum(plan.memory.values()) / 1e9:.1f} GB per GPU, {sum(plan.time.values()):.1f} s per step (modelled)")


def _ddp_step_times(bucket_cap_mb: float, steps: int = 6) -> list[float]:
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)]),
                                    bucket_cap_mb=bucket_cap_mb)
    x = torch.randn(64, 512)
    times = []
    for _ in range(steps):
        model.zero_grad()
        loss = model(x).square().mean()
        start = time.perf_counter()
        loss.backward()          # DDP's hooks launch the buckets and wait for them before returning
        times.append((time.perf_counter() - start) * 1e3)
    return times[1:]


def _deadlock():
    buffer = torch.zeros(1)
    dist.recv(buffer, src=(dist.get_rank() + 1) % 2)


if __name__ == "__main__":
    main()
