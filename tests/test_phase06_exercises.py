"""Mutation tests of Phase 6's graded tests: correct solutions written in other ways get full marks,
the classic RLHF bugs lose points (a sign, a missing stop-gradient, prompt tokens in a sum, clipping
on the wrong side, unnormalised advantages...), and every shortcut through the course's reference
(`utils.rlhf`) or a library loss earns nothing (with tests/test_shortcuts_every_phase.py).

There is no TRL cross-check: TRL pulls datasets, pyarrow and accelerate, too heavy for CI. The DPO
tests check the loss against the paper's formula (eq. 7 of Rafailov et al. 2023), its gradient
(eq. 8) and its properties (log 2 at the start, invariance to a shared shift) instead.
"""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/06_rlhf/rlhf.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex8"]
check_correct = NB.assert_full_marks
check_wrong = NB.assert_loses_points


def test_phase_has_the_eight_exercises_in_order():
    assert NB.exercises() == EXERCISES


# Every exercise: the course's reference in utils.rlhf, and the library loss where one exists.
SHORTCUTS = {
    "ex1": {
        "the course's reference functions": '''
def token_logprobs(logits, tokens):
    return rlhf.token_logprobs(logits, tokens)


def sequence_logprob(logits, tokens, mask):
    return rlhf.sequence_logprob(logits, tokens, mask)
''',
        "a saved alias of the reference module": '''
from utils import rlhf as _r
_t, _s = _r.token_logprobs, _r.sequence_logprob


def token_logprobs(logits, tokens):
    return _t(logits, tokens)


def sequence_logprob(logits, tokens, mask):
    return _s(logits, tokens, mask)
''',
    },
    "ex2": {
        "the course's reference functions": '''
def bradley_terry_loss(r_chosen, r_rejected):
    return rlhf.bradley_terry_loss(r_chosen, r_rejected)


def preference_accuracy(r_chosen, r_rejected):
    return rlhf.preference_accuracy(r_chosen, r_rejected)
''',
        "binary cross-entropy with logits": '''
def bradley_terry_loss(r_chosen, r_rejected):
    d = r_chosen - r_rejected
    return F.binary_cross_entropy_with_logits(d, torch.ones_like(d))


def preference_accuracy(r_chosen, r_rejected):
    return rlhf.preference_accuracy(r_chosen, r_rejected)
''',
    },
    "ex3": {"the course's reference": '''
def kl_penalised_rewards(score, logp, ref_logp, mask, beta):
    return rlhf.kl_penalised_rewards(score, logp, ref_logp, mask, beta)
'''},
    "ex4": {"the course's reference": '''
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    return rlhf.gae(rewards, values, mask, gamma, lam)
'''},
    "ex5": {"the course's reference": '''
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    return rlhf.ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps)
'''},
    "ex6": {"the course's reference functions": '''
def value_loss(values, old_values, returns, mask, clip_range=0.2):
    return rlhf.value_loss(values, old_values, returns, mask, clip_range)


def masked_entropy(logits, mask):
    return rlhf.masked_entropy(logits, mask)
'''},
    "ex7": {
        "the course's reference functions": '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    return rlhf.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def dpo_implicit_reward(policy_logp, ref_logp, beta=0.1):
    return rlhf.dpo_implicit_reward(policy_logp, ref_logp, beta)
''',
        "binary cross-entropy with logits, reference reward": '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    z = beta * ((policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach()))
    return torch.nn.BCEWithLogitsLoss()(z, torch.ones_like(z))


def dpo_implicit_reward(policy_logp, ref_logp, beta=0.1):
    return rlhf.dpo_implicit_reward(policy_logp, ref_logp, beta)
''',
    },
    "ex8": {"the course's reference functions": '''
def grpo_advantages(rewards, eps=1e-4):
    return rlhf.grpo_advantages(rewards, eps)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04):
    return rlhf.grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta)
'''},
}


# ---------------------------------------------------------------------------------------------
# Exercise 1: log-probabilities of a response
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "cross_entropy with reduction='none', a zero column by torch.cat": '''
def token_logprobs(logits, tokens):
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
    return torch.cat([logits.new_zeros(B, 1), -nll.view(B, T - 1)], dim=1)


def sequence_logprob(logits, tokens, mask):
    return torch.where(mask, token_logprobs(logits, tokens), torch.zeros(())).sum(-1)
''',
    "logsumexp and advanced indexing": '''
def token_logprobs(logits, tokens):
    B, T, _ = logits.shape
    out = torch.zeros(B, T, dtype=logits.dtype)
    rows = torch.arange(B)[:, None]
    cols = torch.arange(1, T)[None, :]
    picked = logits[rows, cols - 1, tokens[:, 1:]] - torch.logsumexp(logits[:, :-1], dim=-1)
    out = out.clone()
    out[:, 1:] = picked
    return out


def sequence_logprob(logits, tokens, mask):
    lp = token_logprobs(logits, tokens)
    return torch.stack([lp[b][mask[b]].sum() for b in range(lp.shape[0])])
''',
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_variants_get_full_marks(name):
    check_correct("ex1", EX1_CORRECT[name])


EX1_WRONG = {
    "no shift": ('logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)\n    picked = logp.gather(-1, tokens[:, 1:]',
                 'logp = torch.log_softmax(logits[:, 1:].float(), dim=-1)\n    picked = logp.gather(-1, tokens[:, 1:]'),
    "log of the softmax": ("torch.log_softmax(logits[:, :-1].float(), dim=-1)",
                           "torch.log(torch.softmax(logits[:, :-1].float(), dim=-1))"),
    "probabilities": ("picked = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)",
                      "picked = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).exp()"),
    "prompt tokens summed": ("(token_logprobs(logits, tokens) * mask).sum(dim=-1)",
                             "token_logprobs(logits, tokens).sum(dim=-1)"),
    "mean instead of sum": ("(token_logprobs(logits, tokens) * mask).sum(dim=-1)",
                            "(token_logprobs(logits, tokens) * mask).sum(dim=-1) / mask.sum(-1)"),
    "gradient cut": ("return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)",
                     "return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1).detach()"),
}


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    check_wrong("ex1", mutate("ex1", EX1_WRONG[name]))


def test_ex1_names_the_missing_shift():
    check_wrong("ex1", mutate("ex1", EX1_WRONG["no shift"]), message="no shift", cell="ex1_test_token_logprobs")


def test_ex1_names_prompt_tokens_in_the_sum():
    check_wrong("ex1", mutate("ex1", EX1_WRONG["prompt tokens summed"]), message="prompt and padding tokens summed",
                cell="ex1_test_sequence_logprob")


# ---------------------------------------------------------------------------------------------
# Exercise 2: Bradley-Terry loss and accuracy
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "softplus, and a Python loop for the accuracy": '''
def bradley_terry_loss(r_chosen, r_rejected):
    return F.softplus(r_rejected - r_chosen).mean()


def preference_accuracy(r_chosen, r_rejected):
    score = 0.0
    for c, r in zip(r_chosen.tolist(), r_rejected.tolist()):
        score += 1.0 if c > r else 0.5 if c == r else 0.0
    return score / len(r_chosen)
''',
    "the log-sum-exp trick by hand, torch.where for ties": '''
def bradley_terry_loss(r_chosen, r_rejected):
    z = r_chosen - r_rejected
    return (torch.clamp(-z, min=0) + torch.log1p(torch.exp(-z.abs()))).mean()


def preference_accuracy(r_chosen, r_rejected):
    wins = torch.where(r_chosen > r_rejected, 1.0, torch.where(r_chosen == r_rejected, 0.5, 0.0))
    return float(wins.sum() / wins.numel())
''',
}


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_variants_get_full_marks(name):
    check_correct("ex2", EX2_CORRECT[name])


EX2_WRONG = {
    "sign flipped": ("-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid(r_rejected - r_chosen).mean()"),
    "log of sigmoid (unstable)": ("-F.logsigmoid(r_chosen - r_rejected).mean()",
                                  "-torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()"),
    "sum instead of mean": ("-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid(r_chosen - r_rejected).sum()"),
    "ties count as losses": ("+ 0.5 * (diff == 0).float()", ""),
    "ties count as wins": ("(diff > 0).float() + 0.5 * (diff == 0).float()", "(diff >= 0).float()"),
    "a tensor instead of a float": ("return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()",
                                    "return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()"),
}


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    check_wrong("ex2", mutate("ex2", EX2_WRONG[name]))


def test_ex2_names_the_sign_error():
    check_wrong("ex2", mutate("ex2", EX2_WRONG["sign flipped"]), message="sign flipped", cell="ex2_test_loss")


# ---------------------------------------------------------------------------------------------
# Exercise 3: per-token rewards with a KL penalty
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "a loop over rows": '''
def kl_penalised_rewards(score, logp, ref_logp, mask, beta):
    rewards = torch.where(mask, -beta * (logp - ref_logp), torch.zeros_like(logp))
    for b in range(mask.shape[0]):
        last = int(mask[b].nonzero().max())
        rewards[b, last] = rewards[b, last] + score[b]
    return rewards
''',
    "a one-hot of the last position": '''
def kl_penalised_rewards(score, logp, ref_logp, mask, beta):
    m = mask.float()
    after = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    is_last = m * (1 - after)
    return -beta * (logp - ref_logp) * m + score[:, None] * is_last
''',
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_variants_get_full_marks(name):
    check_correct("ex3", EX3_CORRECT[name])


EX3_WRONG = {
    "score at the last column": ("last = mask.long().cumsum(dim=1).argmax(dim=1)",
                                 "last = torch.full_like(score, mask.shape[1] - 1, dtype=torch.long)"),
    "KL sign flipped": ("rewards = -beta * (logp - ref_logp) * mask", "rewards = beta * (logp - ref_logp) * mask"),
    "KL on the prompt": ("rewards = -beta * (logp - ref_logp) * mask", "rewards = -beta * (logp - ref_logp)"),
    "score at the first response token": ("last = mask.long().cumsum(dim=1).argmax(dim=1)",
                                          "last = mask.long().argmax(dim=1)"),
    "score on every token": ("rewards[torch.arange(score.shape[0]), last] += score",
                             "rewards = rewards + score[:, None] * mask"),
}


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    check_wrong("ex3", mutate("ex3", EX3_WRONG[name]), cell="ex3_test_rewards")


def test_ex3_names_the_last_column_mistake():
    check_wrong("ex3", mutate("ex3", EX3_WRONG["score at the last column"]), message="last column")


# ---------------------------------------------------------------------------------------------
# Exercise 4: GAE
# ---------------------------------------------------------------------------------------------

EX4_CORRECT = {
    "explicit discounted sums of TD errors per row": '''
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    B, T = values.shape
    adv = torch.zeros(B, T, dtype=values.dtype)
    with torch.no_grad():
        for b in range(B):
            pos = [t for t in range(T) if mask[b, t]]
            v = [float(values[b, t]) for t in pos] + [0.0]
            deltas = [float(rewards[b, t]) + gamma * v[i + 1] - v[i] for i, t in enumerate(pos)]
            running = 0.0
            for i in reversed(range(len(pos))):
                running = deltas[i] + gamma * lam * running
                adv[b, pos[i]] = running
    returns = torch.where(mask, adv + values.detach(), torch.zeros(()))
    return adv, returns
''',
    "a bootstrap from the shifted values, then the backward recursion": '''
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    m = mask.to(values.dtype)
    v = values.detach() * m
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    deltas = (rewards.detach() + gamma * next_v - v) * m
    adv = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in range(deltas.shape[1] - 1, -1, -1):
        running = (deltas[:, t] + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + v) * m
''',
}


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_variants_get_full_marks(name):
    check_correct("ex4", EX4_CORRECT[name])


EX4_WRONG = {
    "bootstraps from the padding": ("next_value = values[:, t] * m[:, t]", "next_value = values[:, t]"),
    "no lambda": ("advantages[:, t] = (delta + gamma * lam * next_adv) * m[:, t]",
                  "advantages[:, t] = (delta + gamma * next_adv) * m[:, t]"),
    "forwards": ("for t in reversed(range(values.shape[1])):", "for t in range(values.shape[1]):"),
    "returns without values": ("returns = (advantages + values) * m", "returns = advantages * m"),
    "no stop-gradient": ("rewards, values = rewards.detach(), values.detach()", "pass"),
}


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    check_wrong("ex4", mutate("ex4", EX4_WRONG[name]), cell="ex4_test_gae")


def test_ex4_names_the_padding_bootstrap():
    check_wrong("ex4", mutate("ex4", EX4_WRONG["bootstraps from the padding"]), message="padding")


def test_ex4_names_the_missing_stop_gradient():
    check_wrong("ex4", mutate("ex4", EX4_WRONG["no stop-gradient"]), message="detach them")


# ---------------------------------------------------------------------------------------------
# Exercise 5: PPO's clipped surrogate
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "torch.where on the clipping cases": '''
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    ratio = (logp - old_logp.detach()).exp()
    A = advantages.detach()
    clipped_away = ((A > 0) & (ratio > 1 + clip_eps)) | ((A < 0) & (ratio < 1 - clip_eps))
    objective = torch.where(clipped_away, ratio.clamp(1 - clip_eps, 1 + clip_eps).detach() * A, ratio * A)
    return -objective[mask].mean()
''',
    "the negated maximum of the losses": '''
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2):
    ratio = torch.exp(logp - old_logp.detach())
    A = advantages.detach()
    losses = torch.maximum(-ratio * A, -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    return torch.masked_select(losses, mask).mean()
''',
}


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_variants_get_full_marks(name):
    check_correct("ex5", EX5_CORRECT[name])


EX5_WRONG = {
    "max instead of min": ("objective = torch.min(unclipped, clipped)", "objective = torch.max(unclipped, clipped)"),
    "clipped only": ("objective = torch.min(unclipped, clipped)", "objective = clipped"),
    "no clipping": ("objective = torch.min(unclipped, clipped)", "objective = unclipped"),
    "sign": ("return -(objective * m).sum() / m.sum()", "return (objective * m).sum() / m.sum()"),
    "mean over padding": ("return -(objective * m).sum() / m.sum()", "return -objective.mean()"),
    "old_logp not detached": ("ratio = torch.exp(logp - old_logp.detach())", "ratio = torch.exp(logp - old_logp)"),
    "advantages not detached": ("advantages = advantages.detach()", "pass"),
    "clip only above": ("clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages",
                        "clipped = ratio.clamp(max=1 + clip_eps) * advantages"),
}


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    check_wrong("ex5", mutate("ex5", EX5_WRONG[name]), cell="ex5_test_clipping")


def test_ex5_names_the_missing_stop_gradient():
    check_wrong("ex5", mutate("ex5", EX5_WRONG["old_logp not detached"]), message="detach it")


def test_ex5_names_max_instead_of_min():
    check_wrong("ex5", mutate("ex5", EX5_WRONG["max instead of min"]), message="maximum of the two surrogates")


# ---------------------------------------------------------------------------------------------
# Exercise 6: value loss and entropy
# ---------------------------------------------------------------------------------------------

EX6_CORRECT = {
    "torch.maximum, torch.where, and entropy from probabilities": '''
def value_loss(values, old_values, returns, mask, clip_range=0.2):
    R, old = returns.detach(), old_values.detach()
    clipped = torch.clamp(values, old - clip_range, old + clip_range)
    err = torch.maximum((values - R).pow(2), (clipped - R).pow(2))
    return torch.where(mask, err, torch.zeros(())).sum() / mask.sum() / 2


def masked_entropy(logits, mask):
    p = torch.softmax(logits[:, :-1], dim=-1)
    ent = -(p * torch.log_softmax(logits[:, :-1], dim=-1)).sum(-1)
    return ent[mask[:, 1:]].mean()
''',
    "torch.distributions.Categorical": '''
def value_loss(values, old_values, returns, mask, clip_range=0.2):
    old_values, returns = old_values.detach(), returns.detach()
    v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = 0.5 * torch.max((values - returns) ** 2, (v_clip - returns) ** 2)
    return losses[mask].mean()


def masked_entropy(logits, mask):
    ent = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()
    m = mask[:, 1:].float()
    return (ent * m).sum() / m.sum()
''',
}


@pytest.mark.parametrize("name", EX6_CORRECT)
def test_ex6_correct_variants_get_full_marks(name):
    check_correct("ex6", EX6_CORRECT[name])


EX6_WRONG = {
    "min instead of max": ("errors = torch.max(", "errors = torch.min("),
    "no factor one half": ("return 0.5 * (errors * m).sum() / m.sum()", "return (errors * m).sum() / m.sum()"),
    "returns not detached": ("old_values, returns = old_values.detach(), returns.detach()",
                             "old_values = old_values.detach()"),
    "value mask ignored": ("return 0.5 * (errors * m).sum() / m.sum()", "return 0.5 * errors.mean()"),
    "entropy not shifted": ("logp = torch.log_softmax(logits[:, :-1], dim=-1)",
                            "logp = torch.log_softmax(logits[:, 1:], dim=-1)"),
    "entropy mask ignored": ("return (entropy * m).sum() / m.sum()", "return entropy.mean()"),
    "entropy sign": ("entropy = -(logp.exp() * logp).sum(dim=-1)", "entropy = (logp.exp() * logp).sum(dim=-1)"),
}


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    check_wrong("ex6", mutate("ex6", EX6_WRONG[name]))


def test_ex6_names_the_undetached_returns():
    check_wrong("ex6", mutate("ex6", EX6_WRONG["returns not detached"]), message="regression targets",
                cell="ex6_test_value_loss")


# ---------------------------------------------------------------------------------------------
# Exercise 7: DPO
# ---------------------------------------------------------------------------------------------

EX7_CORRECT = {
    "softplus of the negated margin, no_grad reward": '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    with torch.no_grad():
        ref_margin = ref_chosen - ref_rejected
    return F.softplus(-beta * ((policy_chosen - policy_rejected) - ref_margin)).mean()


def dpo_implicit_reward(policy_logp, ref_logp, beta=0.1):
    with torch.no_grad():
        return beta * policy_logp - beta * ref_logp
''',
    "logits written as in the TRL implementation": '''
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    pi_logratios = policy_chosen - policy_rejected
    ref_logratios = (ref_chosen - ref_rejected).detach()
    logits = pi_logratios - ref_logratios
    return torch.mean(-F.logsigmoid(beta * logits))


def dpo_implicit_reward(policy_logp, ref_logp, beta=0.1):
    return beta * (policy_logp.detach() - ref_logp.detach())
''',
}


@pytest.mark.parametrize("name", EX7_CORRECT)
def test_ex7_correct_variants_get_full_marks(name):
    check_correct("ex7", EX7_CORRECT[name])


EX7_WRONG = {
    "sign": ("return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()",
             "return -F.logsigmoid(beta * (rejected_ratio - chosen_ratio)).mean()"),
    "no beta": ("return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()",
                "return -F.logsigmoid(chosen_ratio - rejected_ratio).mean()"),
    "reference not detached": ("chosen_ratio = policy_chosen - ref_chosen.detach()\n    rejected_ratio = policy_rejected - ref_rejected.detach()",
                               "chosen_ratio = policy_chosen - ref_chosen\n    rejected_ratio = policy_rejected - ref_rejected"),
    "log of sigmoid": ("return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()",
                       "return -torch.log(torch.sigmoid(beta * (chosen_ratio - rejected_ratio))).mean()"),
    "reference ignored": ("chosen_ratio = policy_chosen - ref_chosen.detach()\n    rejected_ratio = policy_rejected - ref_rejected.detach()",
                          "chosen_ratio = policy_chosen\n    rejected_ratio = policy_rejected"),
    "implicit reward with gradient": ("return (beta * (policy_logp - ref_logp)).detach()",
                                      "return beta * (policy_logp - ref_logp)"),
    "implicit reward without beta": ("return (beta * (policy_logp - ref_logp)).detach()",
                                     "return (policy_logp - ref_logp).detach()"),
}


@pytest.mark.parametrize("name", EX7_WRONG)
def test_ex7_mistakes_lose_points(name):
    check_wrong("ex7", mutate("ex7", EX7_WRONG[name]))


def test_ex7_names_the_unfrozen_reference():
    check_wrong("ex7", mutate("ex7", EX7_WRONG["reference not detached"]), message="the reference is frozen",
                cell="ex7_test_loss")


def test_ex7_names_the_sign_error():
    check_wrong("ex7", mutate("ex7", EX7_WRONG["sign"]), message="sign error", cell="ex7_test_loss")


# ---------------------------------------------------------------------------------------------
# Exercise 8: GRPO
# ---------------------------------------------------------------------------------------------

EX8_CORRECT = {
    "std_mean, and per-row lengths by sum": '''
def grpo_advantages(rewards, eps=1e-4):
    std, mean = torch.std_mean(rewards, dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04):
    ratio = (logp - old_logp.detach()).exp()
    A = advantages.detach().unsqueeze(1).expand_as(ratio)
    obj = torch.minimum(ratio * A, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * A)
    d = ref_logp.detach() - logp
    per_token = obj - beta * (d.exp() - d - 1)
    per_token = torch.where(mask, per_token, torch.zeros(()))
    lengths = mask.sum(1)
    return -(per_token.sum(1) / lengths).sum() / logp.shape[0]
''',
    "a loop over responses": '''
def grpo_advantages(rewards, eps=1e-4):
    out = torch.empty_like(rewards)
    for i in range(rewards.shape[0]):
        row = rewards[i]
        out[i] = (row - row.mean()) / (row.std(unbiased=True) + eps)
    return out


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.04):
    total = 0.0
    for i in range(logp.shape[0]):
        lp, old, ref = logp[i][mask[i]], old_logp[i][mask[i]].detach(), ref_logp[i][mask[i]].detach()
        rho = torch.exp(lp - old)
        a = advantages[i].detach()
        s = torch.min(rho * a, rho.clamp(1 - clip_eps, 1 + clip_eps) * a)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        total = total + (s - beta * kl).mean()
    return -total / logp.shape[0]
''',
}


@pytest.mark.parametrize("name", EX8_CORRECT)
def test_ex8_correct_variants_get_full_marks(name):
    check_correct("ex8", EX8_CORRECT[name])


EX8_WRONG = {
    "batch statistics": ("mean = rewards.mean(dim=-1, keepdim=True)\n    std = rewards.std(dim=-1, keepdim=True)",
                         "mean = rewards.mean()\n    std = rewards.std()"),
    "unnormalised advantages": ("return (rewards - mean) / (std + eps)", "return rewards - mean"),
    "no baseline": ("return (rewards - mean) / (std + eps)", "return rewards / (std + eps)"),
    "no eps": ("return (rewards - mean) / (std + eps)", "return (rewards - mean) / std"),
    "token-level mean": ("per_response = ((surrogate - beta * kl) * m).sum(dim=1) / m.sum(dim=1)\n    return -per_response.mean()",
                         "return -((surrogate - beta * kl) * m).sum() / m.sum()"),
    "KL added": ("per_response = ((surrogate - beta * kl) * m)", "per_response = ((surrogate + beta * kl) * m)"),
    "k3 sign": ("log_ratio_ref = ref_logp.detach() - logp", "log_ratio_ref = logp - ref_logp.detach()"),
    "old_logp not detached": ("ratio = torch.exp(logp - old_logp.detach())", "ratio = torch.exp(logp - old_logp)"),
    "ref not detached": ("log_ratio_ref = ref_logp.detach() - logp", "log_ratio_ref = ref_logp - logp"),
    "max instead of min": ("surrogate = torch.min(", "surrogate = torch.max("),
}


@pytest.mark.parametrize("name", EX8_WRONG)
def test_ex8_mistakes_lose_points(name):
    check_wrong("ex8", mutate("ex8", EX8_WRONG[name]))


def test_ex8_names_batch_statistics():
    check_wrong("ex8", mutate("ex8", EX8_WRONG["batch statistics"]), message="whole batch",
                cell="ex8_test_advantages")


def test_ex8_names_the_token_level_mean():
    check_wrong("ex8", mutate("ex8", EX8_WRONG["token-level mean"]), message="per response", cell="ex8_test_loss")
