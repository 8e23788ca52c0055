"""Measure Phase 8 on the course model and print the figures (`make benchmark` runs it).

    .venv/bin/python tests/benchmark_quantization.py               # figures and both notebooks' run times
    .venv/bin/python tests/benchmark_quantization.py --skip-notebooks

Targets (issue 16), printed, not asserted:
* int8 weight-only (per channel) within 1 % of the fp32 perplexity at about 4x less weight memory;
  int4 group-wise within 5 %. The table: format, bits per weight, memory, perplexity.
* weight-only int8 kernels: fp32 matmul, the course's dequantize-then-matmul and PyTorch's fused
  torch._weight_int8pack_mm; torchao's Int8WeightOnlyConfig against the course's int8 when torchao is installed.
* speculative decoding, with and without KV caches: measured alpha, tokens per target call against
  (1 - a^(g+1)) / (1 - a), the cost ratio c, the speed-up predicted by Leviathan et al. and the measured one.
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


def kernels() -> None:
    print(f"\nWeight-only int8 matmul, one CPU thread, median ms ({quantization.cpu_description()}):")
    if not quantization.weight_int8pack_available():
        print(f"torch {torch.__version__} has no CPU torch._weight_int8pack_mm")
    rows = quantization.int8_matmul_timings(((1, 512, 128), (64, 512, 128), (1, 4096, 4096), (16, 4096, 4096)),
                                            repeats=5)
    for r in rows:
        print("  " + "; ".join(f"{k} {v}" for k, v in r.items()))


def library(model, tokenizer) -> None:
    print("\ntorchao's weight-only int8 against the course's (block linear layers, 64 windows):")
    if not quantization.torchao_available():
        print("torchao is not installed: skipped (pip install torchao to run it)")
        return
    start = time.perf_counter()
    result = quantization.torchao_comparison(model, quantization.evaluation_windows(tokenizer, n_windows=64))
    for r in result["rows"]:
        print("  " + "; ".join(f"{k} {v}" for k, v in r.items()))
    print(f"  {result['summary']} ({time.perf_counter() - start:.0f} s with the import)")


def speculative(model, tokenizer) -> None:
    ids = sft.pretraining_ids("train")
    config = GPTConfig(vocab_size=model.config.vocab_size, block_size=model.config.block_size,
                       n_layer=1, n_head=2, n_embd=64)
    start = time.perf_counter()
    draft, _ = inference.train_student(model, config, ids, steps=250, temperature=2.0, soft_weight=0.9)
    print(f"\nSpeculative decoding (draft: {draft.num_parameters():,} parameters, distilled for 250 steps in "
          f"{time.perf_counter() - start:.0f} s; target {model.num_parameters():,}); {quantization.cpu_description()}")
    prompt = torch.tensor([tokenizer.encode("ROMEO:\n")])
    for use_cache, n_sequences in ((True, 16), (False, 8)):
        start = time.perf_counter()
        result = inference.speculative_comparison(model, draft, prompt, n_sequences=n_sequences, use_cache=use_cache)
        plain = result["plain"]
        print(f"{'with' if use_cache else 'without'} KV caches, {n_sequences} continuations of {result['n_new']} "
              f"tokens: target alone {plain['tokens']} tokens in {plain['seconds']:.2f} s "
              f"({plain['ms per target pass']:.2f} ms per pass); all runs {time.perf_counter() - start:.0f} s")
        for r in result["rows"]:
            print(f"  gamma={r['gamma']}: alpha {r['alpha']:.3f}, tokens per target call "
                  f"{r['tokens per target call (measured)']:.2f} (formula {r['tokens per target call (formula)']:.2f}), "
                  f"c {r['c (draft pass / target pass)']:.3f}, wide target pass x{r['target pass over gamma+1 tokens / over 1']:.2f}, "
                  f"speed-up predicted {r['speed-up predicted (Leviathan et al.)']:.2f}, measured "
                  f"{r['speed-up measured']:.2f}x, time outside the models {r['time outside the models']}")


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
    kernels()
    library(model, tokenizer)
    speculative(model, tokenizer)
    if not args.skip_notebooks:
        notebooks()


if __name__ == "__main__":
    main()
