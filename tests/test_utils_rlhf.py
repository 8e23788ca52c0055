"""utils.rlhf and utils.preferences: the reference pieces against independent loops and formulas,
the judges, the preference data, and one short run of every training loop on a tiny GPT."""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import preferences, rlhf
from utils.pretraining import CharTokenizer
from utils.transformer import GPT, GPTConfig

G = torch.Generator().manual_seed(0)


def random_mask(B, T, generator=G):
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(1, T, (1,), generator=generator))
        end = int(torch.randint(start, T, (1,), generator=generator))
        mask[b, start:end + 1] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Reference pieces
# ---------------------------------------------------------------------------------------------

def test_token_and_sequence_logprobs_match_a_loop():
    logits, tokens = torch.randn(3, 7, 5, generator=G), torch.randint(0, 5, (3, 7), generator=G)
    mask = random_mask(3, 7)
    out = rlhf.token_logprobs(logits, tokens)
    for b in range(3):
        assert out[b, 0] == 0
        for t in range(1, 7):
            assert torch.isclose(out[b, t], torch.log_softmax(logits[b, t - 1], -1)[tokens[b, t]], atol=1e-6)
    expected = torch.stack([out[b][mask[b]].sum() for b in range(3)])
    assert torch.allclose(rlhf.sequence_logprob(logits, tokens, mask), expected, atol=1e-6)


def test_bradley_terry_loss_is_log_2_at_equal_scores_and_stable():
    assert math.isclose(float(rlhf.bradley_terry_loss(torch.zeros(4), torch.zeros(4))), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(rlhf.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([1000.0]))), 1000, rel_tol=1e-6)
    assert rlhf.preference_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == 0.5


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token():
    mask = random_mask(4, 9)
    logp, ref, score = -torch.rand(4, 9, generator=G), -torch.rand(4, 9, generator=G), torch.randn(4, generator=G)
    out = rlhf.kl_penalised_rewards(score, logp, ref, mask, 0.1)
    for b in range(4):
        positions = mask[b].nonzero()[:, 0].tolist()
        for t in range(9):
            expected = -0.1 * (logp[b, t] - ref[b, t]) if t in positions else 0.0
            expected = expected + (score[b] if t == positions[-1] else 0.0)
            assert torch.isclose(out[b, t], torch.as_tensor(expected, dtype=out.dtype), atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (1.0, 0.0)])
def test_gae_matches_discounted_sums_of_td_errors(gamma, lam):
    B, T = 4, 10
    mask = random_mask(B, T)
    rewards, values = torch.randn(B, T, generator=G, dtype=torch.float64), torch.randn(B, T, generator=G, dtype=torch.float64)
    adv, ret = rlhf.gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        pos = mask[b].nonzero()[:, 0].tolist()
        v = [float(values[b, t]) for t in pos] + [0.0]
        deltas = [float(rewards[b, t]) + gamma * v[i + 1] - v[i] for i, t in enumerate(pos)]
        for i, t in enumerate(pos):
            expected = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(pos) - i))
            assert math.isclose(float(adv[b, t]), expected, abs_tol=1e-9)
            assert math.isclose(float(ret[b, t]), expected + v[i], abs_tol=1e-9)
    assert float(adv[~mask].abs().max()) == 0 and float(ret[~mask].abs().max()) == 0


def test_ppo_policy_loss_clips_only_where_the_update_went_far_enough():
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 0.5, 1.5]])).requires_grad_(True)
    old = torch.zeros(1, 5, requires_grad=True)
    adv = torch.tensor([[3.0, 1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[False, True, True, True, True]])
    loss = rlhf.ppo_policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    assert math.isclose(loss.item(), 0.15, abs_tol=1e-6)
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -0.125, 0.0, 0.375]]), atol=1e-6)
    assert old.grad is None


def test_value_loss_and_entropy():
    values = torch.tensor([[9.0, 1.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.2, 1.0, 0.0]])
    mask = torch.tensor([[False, True, True, True]])
    assert math.isclose(float(rlhf.value_loss(values, old, returns, mask, 0.2)), 0.875, abs_tol=1e-6)
    uniform = torch.zeros(2, 4, 7)
    assert math.isclose(float(rlhf.masked_entropy(uniform, random_mask(2, 4))), math.log(7), abs_tol=1e-6)


def test_dpo_loss_properties():
    a = [torch.randn(5, generator=G) for _ in range(4)]
    assert math.isclose(float(rlhf.dpo_loss(a[0], a[1], a[0], a[1], 0.1)), math.log(2), rel_tol=1e-6)
    shifted = rlhf.dpo_loss(*[x + 3.0 for x in a], 0.1)
    assert torch.isclose(shifted, rlhf.dpo_loss(*a, 0.1), atol=1e-6)
    margin = (a[0] - a[2]) - (a[1] - a[3])
    assert torch.isclose(rlhf.dpo_loss(*a, 0.3), F.softplus(-0.3 * margin).mean(), atol=1e-6)
    assert torch.isclose(rlhf.ipo_loss(*a, 0.3), ((margin - 1 / 0.6) ** 2).mean(), atol=1e-5)
    assert torch.isclose(rlhf.hinge_loss(*a, 0.3), F.relu(1 - 0.3 * margin).mean(), atol=1e-6)
    assert not rlhf.dpo_implicit_reward(a[0].requires_grad_(True), a[2], 0.1).requires_grad


def test_grpo_advantages_and_zero_gradient_for_an_all_equal_group():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = rlhf.grpo_advantages(rewards)
    assert float(adv[1].abs().max()) == 0
    assert torch.allclose(adv[0], (rewards[0] - 0.5) / (rewards[0].std() + 1e-4))
    logp = torch.randn(2, 6, generator=G).requires_grad_(True)
    loss = rlhf.grpo_loss(logp, logp.detach(), logp.detach(), torch.zeros(2), random_mask(2, 6), 0.2, 0.04)
    loss.backward()
    assert loss.item() == 0 and float(logp.grad.abs().max()) == 0


# ---------------------------------------------------------------------------------------------
# Judges and preference data
# ---------------------------------------------------------------------------------------------

def test_gold_reward_follows_sentiment():
    scores = preferences.gold_reward(["I love thee, sweet and fair!", "O villain, thou shalt die.", "", "Go."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0 and scores[3] == 0


def test_bradley_terry_labels():
    a, b = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    labels = preferences.bradley_terry_labels(a, b, 0.0, torch.Generator().manual_seed(0))
    assert labels[:2].tolist() == [True, False]
    many = preferences.bradley_terry_labels(torch.full((20000,), 0.25), torch.zeros(20000), 0.25,
                                            torch.Generator().manual_seed(1))
    assert abs(float(many.float().mean()) - 1 / (1 + math.exp(-1))) < 0.015


def test_constitution_critique_revise_and_score():
    harsh = "Thy death and blood"
    assert any(c.startswith("kind") for c in preferences.constitution_critique(harsh))
    revised = preferences.constitution_revise(harsh)
    assert revised == "Thy life and bloom!"
    assert not any(c.startswith("kind") for c in preferences.constitution_critique(revised))
    assert preferences.constitution_score("O sweet love, good day!") > preferences.constitution_score(harsh)
    assert preferences.check_exclamation("Away, away, away!") and not preferences.check_exclamation("Away!")


def fake_sampler(texts):
    """A stand-in for rlhf.sample: returns the given lines in turn, as a Rollout of made-up tokens."""
    state = {"i": 0}

    def sample(prompts):
        out = [texts[(state["i"] + k) % len(texts)] for k in range(len(prompts))]
        state["i"] += len(prompts)
        tokens = torch.arange(len(prompts) * 6).view(len(prompts), 6)
        mask = torch.zeros(len(prompts), 6, dtype=torch.bool)
        mask[:, 2:] = True
        return rlhf.Rollout(tokens, mask, out, list(prompts))

    return sample


def test_make_preference_pairs_compares_every_pair_and_drops_ties():
    lines = ["I love thee.", "Go.", "O joy!", "Away."]          # gold: +, 0, +, 0
    pairs = preferences.make_preference_pairs(fake_sampler(lines), 3, per_prompt=4, temperature=0.0, seed=0)
    # Of the 6 pairs per prompt, the two neutral-neutral pairs and the two positive ones differ by < tie? Only ties dropped.
    gold = preferences.gold_reward(lines)
    expected = sum(abs(float(gold[a] - gold[b])) >= 0.05 for a in range(4) for b in range(a + 1, 4))
    assert len(pairs) == 3 * expected
    assert pairs.gold_agreement() == 1.0                   # temperature 0: a noiseless rater
    swapped = pairs.relabel(torch.zeros(len(pairs), dtype=torch.bool))
    assert swapped.gold_agreement() == 0.0 and torch.equal(swapped.chosen, pairs.rejected)
    assert len(pairs.subset([0, 2])) == 2


# ---------------------------------------------------------------------------------------------
# Models and training loops, on a tiny GPT
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    text = "".join(preferences.SPEAKERS) + ":\n abcdefghijklmnopqrstuvwxyz!.,'ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    return model, tokenizer


def test_sample_masks_the_response_up_to_the_first_newline(tiny):
    model, tokenizer = tiny
    rollout = rlhf.sample(model, tokenizer, preferences.cheerful_prompts(5, torch.Generator().manual_seed(0)), 12,
                          generator=torch.Generator().manual_seed(0))
    assert rollout.tokens.shape == (5, 8 + 12) and rollout.mask.shape == (5, 20)
    newline = tokenizer.index["\n"]
    for row, m, text in zip(rollout.tokens, rollout.mask, rollout.texts):
        assert not m[:8].any() and m[8]
        response = row[8:][m[8:]].tolist()
        assert newline not in response[:-1]
        assert text == tokenizer.decode(response).rstrip("\n")
    mixed = rlhf.sample(model, tokenizer, ["A:\n", "BB:\n"], 3, generator=torch.Generator().manual_seed(0))
    assert mixed.tokens.shape == (2, 7) and mixed.mask.sum(1).tolist()[0] <= 3 and not mixed.mask[0, 6]


def synthetic_pairs(tokenizer, n=6, T=16):
    """Chosen responses made of 'a's, rejected ones of 'z's, after the same random prompt."""
    prompt = torch.randint(0, tokenizer.vocab_size, (n, 8), generator=G)
    mask = torch.zeros(n, T, dtype=torch.bool)
    mask[:, 8:] = True
    chosen = torch.cat([prompt, torch.full((n, T - 8), tokenizer.index["a"])], 1)
    rejected = torch.cat([prompt, torch.full((n, T - 8), tokenizer.index["z"])], 1)
    return preferences.PreferencePairs(chosen, mask, rejected, mask.clone(), ["a"] * n, ["z"] * n,
                                       torch.ones(n), torch.zeros(n))


def test_reward_model_starts_at_log_2_and_learns(tiny):
    model, tokenizer = tiny
    rm, losses = rlhf.train_reward_model(model, synthetic_pairs(tokenizer), steps=30, lr=1e-2)
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-5) and losses[-1] < 0.5 * losses[0]
    chosen, rejected = rlhf.score_pairs(rm, synthetic_pairs(tokenizer, n=3))
    assert (chosen > rejected).all()
    assert all(not p.requires_grad for p in rm.backbone.parameters())


def test_every_training_loop_runs_and_reports(tiny):
    model, tokenizer = tiny
    reference = rlhf.frozen(model)
    config = rlhf.RLConfig(iterations=2, batch_size=8, group_size=4, max_new_tokens=8, eval_every=1, eval_samples=4)
    rm = rlhf.RewardModel(model)
    score = lambda rollout: rm(rollout.tokens, rollout.mask)
    for history in (rlhf.ppo_train(rlhf.trainable_copy(model), reference, tokenizer, score, config, reward_model=rm),
                    rlhf.reinforce_train(rlhf.trainable_copy(model), reference, tokenizer,
                                         lambda r: preferences.gold_reward(r.texts), config)):
        assert [row["step"] for row in history] == [0, 1, 2]
        assert all(math.isfinite(row["kl"]) and math.isfinite(row["gold"]) for row in history)
    task = preferences.VerifiableTask("has an a", preferences.cheerful_prompts, lambda prompt, text: "a" in text)
    grpo = rlhf.grpo_train(rlhf.trainable_copy(model), reference, tokenizer, task, config)
    assert [row["step"] for row in grpo] == [0, 1, 2] and all(0 <= row["accuracy"] <= 1 for row in grpo)
    pairs = synthetic_pairs(tokenizer)
    dpo = rlhf.dpo_train(rlhf.trainable_copy(model), reference, tokenizer, pairs, epochs=1, batch_size=3,
                         eval_every=1, eval_samples=4, max_new_tokens=8)
    assert [row["step"] for row in dpo] == [0, 1, 2] and math.isclose(dpo[0]["kl"], 0.0, abs_tol=1e-5)
    bon = rlhf.best_of_n(model, reference, tokenizer, rm, ns=(1, 4), n_prompts=2, max_new_tokens=6)
    assert bon[0]["kl"] == 0 and math.isclose(bon[1]["kl"], math.log(4) - 0.75)
    assert rlhf.frontier_figure({"dpo": dpo}) is not None and rlhf.overoptimisation_figure({"ppo": history}) is not None


def test_pieces_fall_back_to_the_reference_until_written(capsys):
    def sequence_logprob(logits, tokens, mask):
        raise NotImplementedError()

    def my_gae(rewards, values, mask, gamma=1.0, lam=0.95):
        return "mine"

    pieces = rlhf.pieces_from(sequence_logprob, gae=my_gae)
    logits, tokens = torch.randn(2, 4, 3), torch.randint(0, 3, (2, 4))
    mask = torch.tensor([[False, True, True, False]] * 2)
    assert torch.equal(pieces.sequence_logprob(logits, tokens, mask), rlhf.sequence_logprob(logits, tokens, mask))
    assert "not written yet" in capsys.readouterr().out
    assert pieces.gae(None, None, None) == "mine"
    assert pieces.dpo_loss is rlhf.dpo_loss and rlhf.pieces_from().gae is rlhf.gae
    with pytest.raises(ValueError, match="not a piece"):
        rlhf.pieces_from(my_gae)
    with pytest.raises(ValueError, match="not pieces: gea"):
        rlhf.pieces_from(gea=my_gae)


def test_sft_task_checks_exact_answers():
    sft = pytest.importorskip("utils.sft")
    task = preferences.sft_task("count_words", n_pool=20)
    prompt = task.prompts(1, torch.Generator().manual_seed(0))[0]
    assert prompt.startswith(sft.USER) and prompt.endswith(sft.ASSISTANT) and task.stop == sft.END
    words = task.show(prompt).split(":", 1)[1].split()
    assert task.check(prompt, str(len(words))) and not task.check(prompt, str(len(words) + 1))
