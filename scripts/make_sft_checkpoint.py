"""Fine-tune the course's pretrained GPT into a small instruction follower: utils/checkpoints/sft_char.pt.

    python scripts/make_sft_checkpoint.py                      # the shipped recipe (2000 steps: 10 to 40 minutes on one CPU thread)
    python scripts/make_sft_checkpoint.py --steps 20 --out /tmp/sft.pt    # a quick trial

The recipe (utils.sft.SFT_RECIPE and SFT_DATA): start from utils/checkpoints/shakespeare_char.pt
(made by scripts/make_checkpoint.py), add the chat's special tokens (new embedding rows at the mean
of the old ones, old logits unchanged), then full fine-tuning on the training split of the task
families (utils.sft.task_splits; the family `lower` is held out) with the loss on the replies only,
a fifth of every batch's rows being pretraining text (less forgetting), AdamW, warmup and cosine decay.
Accuracy per family and the corpus perplexity, before and after, are stored in the file's metadata
and printed. Seeded: the same torch version, thread count and CPU give the same file.
"""

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import sft  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(sft.SFT_CHECKPOINT), help="where to write the checkpoint")
    parser.add_argument("--steps", type=int, default=None, help="fewer optimizer steps, for a trial run")
    parser.add_argument("--learning-rate", type=float, default=None, help="another peak learning rate (trials)")
    parser.add_argument("--mix", type=float, default=None, help="another share of pretraining text (trials)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 for the shipped file: on a busy 2-core machine 2 threads are slower)")
    args = parser.parse_args(argv)
    changes = {"steps": args.steps, "learning_rate": args.learning_rate, "mix": args.mix}
    config = replace(sft.SFT_RECIPE, **{k: v for k, v in changes.items() if v is not None})
    metadata = sft.make_sft_checkpoint(args.out, config=config, threads=args.threads)
    print(json.dumps({k: v for k, v in metadata.items() if k not in ("base", "sft")}, indent=1))
    print(f"corpus perplexity: {metadata['base']['perplexity']:.2f} before, {metadata['sft']['perplexity']:.2f} after")
    print(f"{'family':<14}{'before':>8}{'after':>8}")
    for family, after in metadata["sft"]["accuracy"].items():
        print(f"{family:<14}{100 * metadata['base']['accuracy'][family]:>7.0f}%{100 * after:>7.0f}%")


if __name__ == "__main__":
    main()
