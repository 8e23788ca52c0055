"""A worker function that runs unchanged under `distributed.launch` and under `torchrun`.

The launcher tests import `allreduce_worker`; the torchrun test starts this file with
`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/torchrun_worker.py`,
and rank 0 prints every rank's result as one JSON line.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import distributed  # noqa: E402


def allreduce_worker(scale: float = 1.0) -> dict:
    """Each rank contributes rank + 1; returns what it sees after an all-reduce and an all-gather."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((3,), float(rank + 1), device=distributed.device())
    dist.all_reduce(x)
    gathered = torch.empty(world, device=distributed.device())
    distributed.all_gather_single(gathered, torch.tensor([float(rank)], device=distributed.device()))
    return {"rank": rank, "world_size": world, "sum": (x * scale).tolist(), "gathered": gathered.tolist(),
            "backend": dist.get_backend()}


if __name__ == "__main__":
    results = distributed.run_under_torchrun(allreduce_worker, 2.0)
    if results is not None:
        print("RESULTS " + json.dumps(results), flush=True)
