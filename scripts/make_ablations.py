"""Train Phase 2's ablations of the GPT block and write utils/data/phase2_ablations.json.

    python scripts/make_ablations.py                       # 6 variants, 1 seed (the shipped table; see its "minutes")
    python scripts/make_ablations.py --seeds 3             # 3 seeds: the figure then shows the spread
    python scripts/make_ablations.py --quick --out /tmp/ablations.json   # a trial in a minute

Every variant of utils.ablations.VARIANTS (the GPT-2 block; no positional encoding; RoPE; post-LN; a SiLU
MLP; a SwiGLU MLP of the same parameter count) is trained with the same recipe, the same initialisation
seed and the same batches in the same order, on the character-level Shakespeare corpus of utils.pretraining,
and its loss is measured on fixed batches of the held-out text. The budget is tiny on purpose (a 2-layer
model of width 64, a few hundred steps): the table says what happens early in training at this size,
not what happens to a large model trained to the end.
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import ablations  # noqa: E402

RECIPE = ablations.AblationConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=32, steps=500,
                                  lr=3e-3, warmup=50, eval_batches=40)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ablations.SHIPPED_FILE))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=RECIPE.steps)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="30 steps, one seed: a trial")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ablations.AblationConfig(**{**RECIPE.__dict__, "steps": 30 if args.quick else args.steps,
                                         "eval_batches": 4 if args.quick else RECIPE.eval_batches})
    seeds = range(1 if args.quick else args.seeds)
    load = os.getloadavg()[0]  # how busy the machine was: the seconds per run depend on it
    start = time.perf_counter()
    results = []
    for seed in seeds:  # the file is rewritten after each seed, so an interrupted run keeps what it measured
        results += ablations.run_ablations(config, seeds=[seed], device="cpu", log=lambda line: print(line, flush=True))
        minutes = (time.perf_counter() - start) / 60
        ablations.save_shipped(results, config, args.out, seeds=seed + 1, minutes=round(minutes, 1),
                               machine=f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} thread(s), load average {load:.1f} at the start",
                               torch=torch.__version__, made_by="python scripts/make_ablations.py")
    for name, row in ablations.summarise(results).items():
        print(f"{name:14s} {row['mean']:.4f}  (seeds: {row['low']:.4f} .. {row['high']:.4f})")
    print(f"wrote {args.out} in {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
