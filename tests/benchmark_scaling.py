"""Measure Phase 4's sweeps and fits and print the figures (`make benchmark` runs it).

    .venv/bin/python tests/benchmark_scaling.py            # the live sweep as the notebook runs it on a CPU
    .venv/bin/python tests/benchmark_scaling.py --markov   # also a small live sweep on the Markov corpus

Printed: the shipped sweep's Approach 2 exponents and its Markov floor beside the true entropy rate,
the live sweep's exponents and wall time, and how long one Approach 3 fit (the reference, as a
student's exercise 5 runs it) takes. The notebook's run time and its autograding time are measured
with every phase's by tests/benchmark.py (targets: 5 minutes and 60 s). These are measurements to read,
not assertions: tiny models are noisy, and timings depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from machine import describe  # noqa: E402
from utils import pretraining, scaling  # noqa: E402

# The notebook's live sweep on a CPU (section 4).
LIVE_BUDGETS = (4e8, 1.2e9, 3.6e9)
LIVE_SIZES = scaling.SWEEP_SIZES[:4]


def exponents(runs) -> str:
    result = scaling.approach2(runs, points=3)     # the parabola through the three runs around each minimum
    minima = ", ".join(f"C={c:.1e}: N_opt={n:,.0f}" for c, n in result["n_opt"].items())
    inside = all(min(r["N"] for r in rs) < result["n_opt"][c] < max(r["N"] for r in rs)
                 for c, rs in scaling.group_by_budget(runs).items())
    return (f"N_opt ~ C^{result['a']:.2f}, D_opt ~ C^{result['b']:.2f} ({minima}; "
            f"every minimum inside its sampled sizes: {inside})")


def markov_floor(runs, entropy) -> str:
    e, _, alpha = scaling.fit_power_law([r["N"] for r in runs], [r["loss"] for r in runs])
    return f"fitted E = {e:.4f} (alpha {alpha:.2f}) against the true entropy rate {entropy:.4f} nats/symbol"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markov", action="store_true", help="also run a small live sweep on the Markov corpus")
    args = parser.parse_args()
    print(describe())

    sweep = scaling.load_sweep()
    print(f"\nshipped sweep ({sweep['made_by']['seconds']} s to make, torch {sweep['made_by']['torch']}):")
    print("  Shakespeare IsoFLOP, Approach 2: " + exponents(sweep["shakespeare"]))
    print("  Markov corpus: " + markov_floor(sweep["markov"]["runs"], sweep["markov"]["entropy"]))

    text = pretraining.shakespeare_text()
    tokenizer = pretraining.CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = pretraining.train_val_split(ids)
    start = time.perf_counter()
    live = scaling.run_sweep(train_ids, val_ids, tokenizer.vocab_size, LIVE_BUDGETS, LIVE_SIZES, min_iters=10,
                             eval_iters=5)
    print(f"\nlive sweep as in the notebook ({len(live)} runs, {time.perf_counter() - start:.0f} s):")
    print("  Approach 2: " + exponents(live))

    if args.markov:
        source = scaling.MarkovSource()
        generator = torch.Generator().manual_seed(1)
        data = source.sample(300_000, generator)
        start = time.perf_counter()
        runs = [scaling.train_tiny_gpt(data[:250_000], data[250_000:], source.vocab_size, size, 100 * 32 * 64,
                                       eval_iters=20).__dict__ for size in scaling.SWEEP_SIZES[:5]]
        print(f"\nlive Markov sweep ({time.perf_counter() - start:.0f} s): " + markov_floor(runs, source.entropy))

    g = torch.Generator().manual_seed(0)
    n = 10 ** (7 + 3 * torch.rand(60, generator=g, dtype=torch.float64))
    d = 10 ** (8 + 3 * torch.rand(60, generator=g, dtype=torch.float64))
    loss = scaling.chinchilla_loss(n, d) * torch.exp(0.005 * torch.randn(60, generator=g, dtype=torch.float64))
    start = time.perf_counter()
    fit = scaling.fit_chinchilla(n, d, loss)
    print(f"\nApproach 3 on 60 noisy synthetic runs: {time.perf_counter() - start:.1f} s; "
          + ", ".join(f"{k} = {v:.3g}" for k, v in fit.items())
          + f" (truth {', '.join(f'{k} = {v:g}' for k, v in scaling.CHINCHILLA.items())})")
    a = scaling.CHINCHILLA["beta"] / (scaling.CHINCHILLA["alpha"] + scaling.CHINCHILLA["beta"])
    print(f"exponent of N_opt from that fit: {fit['beta'] / (fit['alpha'] + fit['beta']):.3f} (truth {a:.3f}); "
          f"published fit at Gopher's compute: N_opt = {scaling.compute_optimal(5.76e23)[0]:.3g}")
    if not math.isfinite(fit["E"]):
        raise SystemExit("the Approach 3 fit failed")


if __name__ == "__main__":
    main()
