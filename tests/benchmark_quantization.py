"""Measure Phase 8 on the course model and print the figures (`make benchmark` runs it).

    .venv/bin/python tests/benchmark_quantization.py               # figures and both notebooks' run times
    .venv/bin/python tests/benchmark_quantization.py --skip-notebooks

Targets (issue 16), printed, not asserted:
* int8 weight-only (per channel) within 1 % of the fp32 perplexity at about 4x less weight memory;
  int4 group-wise within 5 %. The table: format, bits per weight, memory, perplexity.
* speculative decoding: measured tokens per target call against (1 - a^(g+1)) / (1 - a), and the speed-up.
* each of the two solution notebooks end to end in <= 5 minutes on 2 CPU cores (autograding time is
  measured for every phase by tests/benchmark.py).
Timings depend on the machine and on what else runs on it: the first line says how busy it was.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from machine import describe  # noqa: E402
from utils import inference, quantization, sft  # noqa: E402
from utils.pretraining import load_pretrained  # noqa: E402
from utils.transformer import GPTConfig  # noqa: E402

NOTEBOOK_TARGET_S = 300


def formats(model, tokenizer) -> None:
    windows = quantization.evaluation_windows(tokenizer, n_windows=64)
    start = time.perf_counter()
    rows = quantization.format_comparison(model, windows, group_size=32)
    print(f"\nWeight formats on the course model ({len(windows)} validation windows of 128 characters, "
          f"{time.perf_counter() - start:.1f} s):")
    print(f"{'format':22s} {'bits/weight':>11s} {'memory KiB':>11s} {'perplexity':>11s} {'vs fp32':>9s}")
    for r in rows:
        print(f"{r['format']:22s} {r['bits_per_weight']:>11} {r['memory_kib']:>11} {r['perplexity']:>11.4f} {r['vs_fp32']:>9s}")
    by = {r["format"]: r for r in rows}
    fp32 = by["fp32"]
    int8, int4 = by["int8 per channel"], by["int4 groups of 32"]
    print(f"target int8 within 1 %: {int8['vs_fp32']} at {fp32['memory_kib'] / int8['memory_kib']:.2f}x less "
          f"weight memory -> {'met' if abs(int8['perplexity'] / fp32['perplexity'] - 1) <= 0.01 else 'MISSED'}")
    print(f"target int4 groups within 5 %: {int4['vs_fp32']} -> "
          f"{'met' if int4['perplexity'] / fp32['perplexity'] - 1 <= 0.05 else 'MISSED'}")


def speculative(model, tokenizer) -> None:
    ids = sft.pretraining_ids("train")
    config = GPTConfig(vocab_size=model.config.vocab_size, block_size=model.config.block_size,
                       n_layer=1, n_head=2, n_embd=64)
    start = time.perf_counter()
    draft, _ = inference.train_student(model, config, ids, steps=250, temperature=2.0, soft_weight=0.9)
    print(f"\nSpeculative decoding (draft: {draft.num_parameters():,} parameters, distilled for 250 steps in "
          f"{time.perf_counter() - start:.0f} s; target {model.num_parameters():,}):")
    prompt = torch.tensor([tokenizer.encode("ROMEO:\n")])
    n_new = 300
    base = inference.autoregressive_generate(model, prompt, n_new)
    print(f"target alone: {n_new / base.seconds:.0f} tokens/s")
    for gamma in (1, 2, 4, 6):
        run = inference.speculative_generate(model, draft, prompt, n_new, gamma=gamma)
        alpha = sum(run.alphas) / len(run.alphas)
        print(f"gamma={gamma}: alpha {alpha:.3f}, tokens per target call {n_new / run.target_calls:.2f} "
              f"(formula {inference.expected_tokens_per_step(alpha, gamma):.2f}), speed-up {base.seconds / run.seconds:.2f}x")


def notebooks() -> None:
    import nbformat
    from nbclient import NotebookClient

    print("\nSolution notebooks end to end (target <= 300 s each on 2 cores):")
    for path in sorted((ROOT / "solutions" / "08_quantization").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, timeout=900, resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
        print(f"{path.name:20s} {seconds:6.0f} s  {'met' if seconds <= NOTEBOOK_TARGET_S else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-notebooks", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(describe())
    model, tokenizer = load_pretrained(device="cpu")
    formats(model, tokenizer)
    speculative(model, tokenizer)
    if not args.skip_notebooks:
        notebooks()


if __name__ == "__main__":
    main()
