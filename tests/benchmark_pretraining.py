"""Phase 3's throughput anchor: the course's GPT and trainer on nanoGPT's CPU recipe (prints figures).

    python tests/benchmark_pretraining.py                    # 3 runs, the best is quoted
    python tests/benchmark_pretraining.py --runs 1 --iters 200

nanoGPT's shakespeare-char CPU recipe (README of karpathy/nanoGPT): 4 layers, 4 heads, 128 dimensions,
block 64, batch 12, 2000 iterations, learning rate 1e-3 warmed up over 100 iterations then cosine-decayed
to 1e-4, AdamW (0.9, 0.99) with weight decay 0.1 on the matrices, clipping at 1, no dropout, no biases,
evaluation every 250 iterations (and at the end) on 20 batches per split, 2 torch threads. On a quiet 2-core CI-class
machine it takes 72-82 s for the whole process (19,000-21,000 tokens/s) and reaches val loss 1.886
(train 1.765) by its own 20-batch estimate.

This script trains the course's reference GPT (utils.transformer) with the course's trainer
(utils.pretraining.train) on the same recipe and the same file, the 1.1 MB tiny-shakespeare text
(90/10 split, characters as tokens). It needs that file (by default ../shared/data/tinyshakespeare.txt
next to the repository, or --data); the course itself never does. It prints, per run: the wall time of
the whole process up to the end of the run (imports and data preparation included, like nanoGPT's
figure), the training loop's own time (evaluations included), tokens per second both ways, and the
final losses twice: by nanoGPT's own estimate (20 batches per split at iteration 2000, which varies by
about +-0.02 with the batches drawn) and on 200 batches per split. Not a test: pytest does not collect it.

Timings on a shared machine are noisy: other processes take cores, and a 2-thread run slows sharply
when it gets fewer than 2 free cores. Quote the best of several runs, and say so.
"""

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from machine import describe  # noqa: E402
from utils import pretraining  # noqa: E402
from utils.transformer import GPT, GPTConfig  # noqa: E402

NANOGPT = {"seconds": "72-82", "tokens_per_second": "19,000-21,000", "val_loss": 1.886, "train_loss": 1.765}
TARGET_VAL_LOSS = 1.90


get_batch = pretraining.random_batch   # nanoGPT's sampler: independent uniform starts, targets shifted by one


def one_run(train_ids, val_ids, vocab_size, iters, seed, threads):
    torch.set_num_threads(threads)
    config = pretraining.TrainConfig(
        max_iters=iters, batch_size=12, block_size=64, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
        weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_iters=20, seed=seed)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0, bias=False))
    start = time.perf_counter()
    result = pretraining.train(model, train_ids, val_ids, config, get_batch, device=torch.device("cpu"),
                               show_progress=False)  # evaluates at 2000 too, as nanoGPT does
    loop_seconds = time.perf_counter() - start
    final = pretraining.estimate_loss(model, {"train": train_ids, "val": val_ids}, get_batch, batch_size=12,
                                      block_size=64, iters=200, generator=torch.Generator().manual_seed(seed + 7))
    return result, loop_seconds, final


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)

    path = Path(args.data)
    if not path.exists():
        sys.exit(f"{path} not found: pass --data <tinyshakespeare.txt> (the benchmark file; the course never needs it)")
    text = pretraining.load_text(path)
    tokenizer = pretraining.CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = pretraining.train_val_split(ids)
    print(f"{describe()}; {args.threads} torch threads")
    print(f"data: {path.name}, {len(text):,} characters, vocabulary {tokenizer.vocab_size}, "
          f"{len(train_ids):,} train / {len(val_ids):,} val tokens")
    print(f"recipe: nanoGPT shakespeare-char on CPU, {args.iters} iterations of 12 x 64 tokens")
    rows = []
    for run in range(args.runs):
        result, loop_seconds, final = one_run(train_ids, val_ids, tokenizer.vocab_size, args.iters,
                                              args.seed + run, args.threads)
        process_seconds = time.perf_counter() - PROCESS_START if run == 0 else None
        tokens = result.tokens
        rows.append((loop_seconds, tokens / loop_seconds, final))
        whole = (f"whole process {process_seconds:.1f} s ({tokens / process_seconds:,.0f} tokens/s), "
                 if process_seconds else "")
        print(f"run {run + 1}: {whole}training loop {loop_seconds:.1f} s ({tokens / loop_seconds:,.0f} tokens/s, "
              f"evaluations included); final loss on 20 batches (nanoGPT's estimate): train {result.evals[-1][1]:.3f}, "
              f"val {result.evals[-1][2]:.3f}; on 200 batches: train {final['train']:.3f}, val {final['val']:.3f}; "
              f"load average now {os.getloadavg()[0]:.2f}")
    best = min(rows, key=lambda r: r[0])
    vals = [r[2]["val"] for r in rows]
    mean = sum(vals) / len(vals)
    print()
    print(f"best of {len(rows)} runs: {best[0]:.1f} s for the training loop, {best[1]:,.0f} tokens/s")
    print(f"final val loss on 200 batches: {min(vals):.3f} to {max(vals):.3f}, mean {mean:.3f} "
          f"(target <= {TARGET_VAL_LOSS}); "
          f"nanoGPT: {NANOGPT['val_loss']} (train {NANOGPT['train_loss']}) in {NANOGPT['seconds']} s, "
          f"{NANOGPT['tokens_per_second']} tokens/s on a quiet 2-core machine")
    print("Timings from a shared machine are pessimistic: quote the best run, and compare side by side "
          "with nanoGPT on one machine.")


if __name__ == "__main__":
    main()
