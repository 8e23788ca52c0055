"""Measure Phase 6's alignment runs and print the figures (`make benchmark` runs it).

    .venv/bin/python tests/benchmark_rlhf.py            # the notebook's CPU configuration
    .venv/bin/python tests/benchmark_rlhf.py --scale 2  # twice the data and iterations

Printed: the reward model's held-out accuracy (beside the gold reward's own agreement with the noisy
labels); the gold reward (VADER) of the base model and after PPO (against the learned reward, with
and without the KL penalty), DPO (on the same pairs, and on AI labels), each at the KL it reached;
the verifiable task's accuracy before and after GRPO; and the seconds each step took. The pipeline
and its sizes are the solution notebook's (utils.rlhf, utils.preferences, reference pieces). These are
measurements to read, not assertions: timings depend on the machine and on what else runs on it.
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
from utils import pretraining, preferences, rlhf, runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply data and iterations")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (one is fastest for a model this small, and robust on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runtime.seed_everything(0)
    print(describe())
    s = args.scale
    device = runtime.get_device()
    n_new, iters, every = 24, int(24 * s), max(1, int(6 * s))
    base, tokenizer = pretraining.load_pretrained(device=device)
    reference = rlhf.frozen(base)

    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(1)
    sampler = lambda prompts: rlhf.sample(base, tokenizer, prompts, n_new, generator=generator)  # noqa: E731
    train_pairs = preferences.make_preference_pairs(sampler, int(640 * s), seed=1)
    held_out = preferences.make_preference_pairs(sampler, int(160 * s), seed=2)
    print(f"preference data: {len(train_pairs)} training pairs, {len(held_out)} held-out pairs "
          f"({time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    reward_model, _ = rlhf.train_reward_model(base, train_pairs, steps=300)
    chosen, rejected = rlhf.score_pairs(reward_model, held_out)
    print(f"reward model: held-out accuracy {rlhf.preference_accuracy(chosen, rejected):.1%} "
          f"(the gold reward on the same noisy labels: {held_out.gold_agreement():.1%}) "
          f"({time.perf_counter() - start:.1f} s)")

    proxy = lambda rollout: reward_model(rollout.tokens, rollout.mask)  # noqa: E731
    config = rlhf.RLConfig(iterations=iters, batch_size=32, max_new_tokens=n_new, lr=3e-4, eval_every=every)
    runs = {}
    for name, beta in (("PPO vs reward model, beta 0.05", 0.05), ("PPO vs reward model, beta 0", 0.0)):
        runs[name] = rlhf.ppo_train(rlhf.trainable_copy(base), reference, tokenizer, proxy,
                                    rlhf.replace(config, beta=beta), reward_model=reward_model)
    runs["DPO, beta 0.1"] = rlhf.dpo_train(rlhf.trainable_copy(base), reference, tokenizer, train_pairs, epochs=2,
                                           lr=3e-4, eval_every=every, max_new_tokens=n_new)
    ai_pairs = train_pairs.relabel(preferences.constitution_labels(train_pairs.chosen_text, train_pairs.rejected_text,
                                                                   torch.Generator().manual_seed(2)))
    runs["DPO on AI labels"] = rlhf.dpo_train(rlhf.trainable_copy(base), reference, tokenizer, ai_pairs, epochs=2,
                                              lr=3e-4, eval_every=every, max_new_tokens=n_new)
    print(f"\n{'method':32} {'gold before':>11} {'gold after':>10} {'best gold':>9} {'KL at end':>9} {'seconds':>8}")
    for name, history in runs.items():
        best = max(history, key=lambda row: row["gold"])
        print(f"{name:32} {history[0]['gold']:+11.3f} {history[-1]['gold']:+10.3f} {best['gold']:+9.3f} "
              f"{history[-1]['kl']:9.2f} {history[-1]['seconds']:8.0f}")
    try:
        from utils import sft

        grpo_base, grpo_tokenizer = sft.load_sft_model(device=device)
        task = preferences.sft_task("count_words")
    except FileNotFoundError:
        grpo_base, grpo_tokenizer, task = base, tokenizer, preferences.exclamation_task()
    grpo = rlhf.grpo_train(rlhf.trainable_copy(grpo_base), rlhf.frozen(grpo_base), grpo_tokenizer, task,
                           rlhf.replace(config, batch_size=64, beta=0.04))
    print(f"{'GRPO, ' + task.name + ' task':32} accuracy {grpo[0]['accuracy']:.1%} -> {grpo[-1]['accuracy']:.1%} "
          f"at KL {grpo[-1]['kl']:.2f} ({grpo[-1]['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
