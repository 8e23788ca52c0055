"""Run the sweeps of tiny GPTs that Phase 4 ships, and write utils/data/scaling_sweep.json.

    python scripts/make_scaling_sweep.py                  # both sweeps (about 10-30 minutes on 1 CPU thread)
    python scripts/make_scaling_sweep.py --part markov    # redo one sweep, keep the other
    python scripts/make_scaling_sweep.py --quick --out /tmp/sweep.json   # a trial in a minute

Two sweeps of the course's reference GPT (utils.transformer.GPT), trained with utils.pretraining.train
(AdamW, warmup then cosine decay ending exactly at each run's token budget):

* "shakespeare": an IsoFLOP sweep on the character-level Shakespeare corpus (utils.pretraining): for
  each compute budget C, every size of utils.scaling.SWEEP_SIZES with a sensible number of
  iterations is trained on D = C / (6 N) tokens (N = non-embedding parameters).
* "markov": models of every size trained on the same number of tokens of text from a random Markov
  chain over 32 symbols (utils.scaling.MarkovSource) whose entropy rate, the loss no model can beat,
  is known exactly; small models cannot represent its 32 x 32 transition table, larger ones come close.

Everything is seeded; losses change in the last digits across machines and torch versions. The
results are illustrative: models this small are noisy, and their curves need not follow the laws
measured at 10^7 to 10^10 parameters.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import pretraining, scaling  # noqa: E402

SHAKESPEARE_BUDGETS = (1e10, 3e10, 1e11)
MARKOV_SIZES = ((1, 1, 4), (1, 1, 8), (1, 1, 12), (1, 1, 16), (1, 2, 24), (1, 2, 32))
MARKOV_TOKENS = 150 * 32 * 64


def shakespeare_sweep(budgets, sizes, max_iters, log):
    text = pretraining.shakespeare_text()
    tokenizer = pretraining.CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = pretraining.train_val_split(ids)
    sizes = [s for s in sizes]
    runs = []
    for c in budgets:
        for size in sizes:
            config = scaling.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=size[0],
                                       n_head=size[1], n_embd=size[2])
            iters = c / (6 * scaling.gpt_parameters(config, non_embedding=True)) / (32 * 64)
            if not 25 <= iters <= max_iters:
                continue
            run = scaling.run_sweep(train_ids, val_ids, tokenizer.vocab_size, [c], [size], min_iters=1)[0]
            log(f"shakespeare C={c:.1e} size={size}: N={run['N']} D={run['D']} loss={run['loss']:.4f} "
                f"({run['seconds']:.0f} s)")
            runs.append(run)
    return runs


def markov_sweep(sizes, tokens, log):
    source = scaling.MarkovSource()
    generator = torch.Generator().manual_seed(0)
    train_ids = source.sample(tokens + 100_000, generator)
    val_ids = source.sample(100_000, generator)
    runs = []
    for size in sizes:
        run = scaling.train_tiny_gpt(train_ids, val_ids, source.vocab_size, size, tokens, eval_iters=50)
        run = {**run.__dict__}
        log(f"markov size={size}: N={run['N']} loss={run['loss']:.4f} (entropy {source.entropy:.4f}, "
            f"{run['seconds']:.0f} s)")
        runs.append(run)
    return dict(entropy=source.entropy, vocab_size=source.vocab_size, order=source.order, runs=runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(scaling.SWEEP_FILE))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny budgets, for a trial")
    parser.add_argument("--part", choices=("shakespeare", "markov"), default=None,
                        help="run only this sweep and keep the other from the existing --out file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(line):
        print(f"[{time.time() - start:6.0f} s] {line}", flush=True)

    out = Path(args.out)
    result = json.loads(out.read_text()) if args.part else {}
    budgets = (1e9, 3e9) if args.quick else SHAKESPEARE_BUDGETS
    if args.part in (None, "shakespeare"):
        result["shakespeare"] = shakespeare_sweep(budgets, scaling.SWEEP_SIZES, 3000, log)
    if args.part in (None, "markov"):
        result["markov"] = markov_sweep(MARKOV_SIZES[:3] if args.quick else MARKOV_SIZES,
                                        MARKOV_TOKENS // (20 if args.quick else 1), log)
    seconds = round(time.time() - start) + (result.get("made_by", {}).get("seconds", 0) if args.part else 0)
    result["made_by"] = {"script": "scripts/make_scaling_sweep.py", "torch": str(torch.__version__),
                         "threads": args.threads, "machine": platform.machine(), "seconds": seconds}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
