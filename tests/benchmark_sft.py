"""Phase 5's figures (prints them; not a test): what fine-tuning the course's model gains and costs.

    python tests/benchmark_sft.py                 # LoRA trained here with the shipped recipe's steps
    python tests/benchmark_sft.py --lora-steps 100 --per-family 20     # quicker

Prints, on the held-out test instances of every task family (exact match, greedy):
  * the pretrained model (with the chat tokens added), the shipped full-SFT checkpoint
    (utils/checkpoints/sft_char.pt, made by scripts/make_sft_checkpoint.py) and a LoRA run trained here
    (rank 16 on every linear layer of the blocks, the shipped recipe otherwise, learning rate 5e-3);
  * the Shakespeare perplexity (validation text) of each: the forgetting;
  * padding against packing: real tokens per second of forward + backward on the same examples.
The target of issue 14: after SFT at least three families reach 80 % on unseen instances, from near 0.
Timings on a shared machine are noisy: the first line says how busy it was.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from machine import describe  # noqa: E402
from utils import lora, sft  # noqa: E402


def packing_speed(model, tokenizer, examples, rows_per_batch=8, batch_size=16):
    data = [sft.tokenize_chat(tokenizer, ex.messages(), model.config.block_size)[:2] for ex in examples]
    real = sum(len(x) for x, _ in data)
    padded = [sft.pad_batch(data[i:i + batch_size], tokenizer.pad_id) for i in range(0, len(data), batch_size)]
    packed_all = sft.pack_examples(data, model.config.block_size, tokenizer.pad_id)
    packed = [tuple(t[i:i + rows_per_batch] for t in packed_all) for i in range(0, len(packed_all[0]), rows_per_batch)]
    out = {}
    for name, batches, forward in [
            ("padding", padded, lambda b: sft.sequence_loss(model(b[0])[0], b[1])),
            ("packing", packed, lambda b: sft.sequence_loss(sft.forward_packed(model, b[0], b[2], b[3]), b[1]))]:
        start = time.perf_counter()
        for batch in batches:
            forward(batch).backward()
        seconds = time.perf_counter() - start
        positions = sum(b[0].numel() for b in batches)
        out[name] = (real / seconds, real / positions)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-steps", type=int, default=sft.SFT_RECIPE.steps)
    parser.add_argument("--per-family", type=int, default=50, help="test instances per family")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(describe())
    splits = sft.task_splits(**sft.SFT_DATA)
    evaluation = sft.evaluation_set(splits, args.per_family)
    base, tokenizer = sft.base_chat_model(device="cpu")
    full, _ = sft.load_sft_model(device="cpu")
    adapted, _ = sft.base_chat_model(device="cpu")
    lora.add_lora(adapted, 16, 32.0, lora.DEFAULT_TARGETS)
    # the chat tokens' rows train too (they all start at the same row; frozen, the model never stops)
    lora.train_new_token_rows(adapted, min(tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id,
                                           tokenizer.pad_id))
    config = replace(sft.SFT_RECIPE, steps=args.lora_steps, learning_rate=5e-3)
    result = sft.sft_train(adapted, tokenizer, splits.train, config, pretrain_ids=sft.pretraining_ids(),
                           show_progress=False)
    trainable, total = lora.count_trainable(adapted)
    print(f"LoRA r=16: {trainable:,} of {total:,} parameters trained, {args.lora_steps} steps in {result.seconds:.0f} s "
          f"({result.tokens_per_second:,.0f} tokens/s); full SFT (shipped): {full.metadata.get('seconds')} s")
    models = {"pretrained": base, "full SFT": full, "LoRA r=16": adapted}
    table = {}
    for name, model in models.items():
        start = time.perf_counter()
        table[name] = sft.evaluate(model, tokenizer, evaluation, max_new_tokens=40)
        print(f"evaluated {name} on {len(evaluation)} instructions in {time.perf_counter() - start:.0f} s")
    print(f"\n{'family':<24}" + "".join(f"{name:>14}" for name in models))
    for family in sft.FAMILIES:
        label = family + (" (held out)" if family == sft.HELD_OUT_FAMILY else "")
        print(f"{label:<24}" + "".join(f"{100 * table[name][family]:>13.0f}%" for name in models))
    print(f"{'Shakespeare perplexity':<24}" + "".join(f"{sft.corpus_perplexity(m):>14.2f}" for m in models.values()))
    reached = [f for f, a in table["full SFT"].items() if a >= 0.8 and f != sft.HELD_OUT_FAMILY]
    print(f"\nfamilies at >= 80 % after full SFT: {len(reached)} ({', '.join(reached) or 'none'}); target: 3")
    speed = packing_speed(base.train(), tokenizer, splits.train[:256])
    for name, (tps, share) in speed.items():
        print(f"{name}: {tps:,.0f} real tokens/s, {share:.0%} of the positions are real tokens")


if __name__ == "__main__":
    main()
