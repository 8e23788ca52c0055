"""Phase 6 helpers: rollouts, the reference losses, reward and value models, and the training loops
of RLHF (PPO), DPO and GRPO on the course's small GPT.

The graded exercises of Phase 6 are the losses and estimators; the reference versions below are
what the hidden tests compare with (and switch off while your code runs). The training loops take
the pieces as arguments (``Pieces``), so the notebook runs them with yours.

* rollouts: ``Rollout``, ``sample`` (KV-cached sampling at temperature 1, a response mask that
  ends with the first stop token: a newline, or ``<|end|>`` for the SFT model), ``forward_with_hidden``
* reference pieces: ``token_logprobs``, ``sequence_logprob``, ``bradley_terry_loss``,
  ``preference_accuracy``, ``kl_penalised_rewards``, ``gae``, ``ppo_policy_loss``, ``value_loss``,
  ``masked_entropy``, ``dpo_loss``, ``dpo_implicit_reward``, ``ipo_loss``, ``hinge_loss``,
  ``grpo_advantages``, ``grpo_loss``, ``masked_mean``, ``whiten``
* models: ``RewardModel`` (per-token scores on a frozen copy of the backbone, averaged over the response), ``ValueHead``; ``frozen``,
  ``trainable_copy``; ``RLConfig`` (and ``replace``, to change one of its fields)
* training: ``train_reward_model``, ``reinforce_train``, ``ppo_train``, ``dpo_train``,
  ``grpo_train``, ``evaluate_policy``, ``best_of_n``
* figures: ``overoptimisation_figure``, ``frontier_figure``, ``history_figure``
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots, runtime
from .transformer import GPT

# ---------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------


@dataclass
class Rollout:
    """Sampled responses: ``tokens`` (B, T) = prompt + response, ``mask`` (B, T) True on the response
    tokens (from the end of the prompt up to and including the first newline), ``texts`` the lines."""

    tokens: torch.Tensor
    mask: torch.Tensor
    texts: list
    prompts: list


def response_mask(tokens: torch.Tensor, prompt_length: int, stop_id: int | None) -> torch.Tensor:
    """True from ``prompt_length`` up to and including the first ``stop_id`` (or to the end)."""
    B, T = tokens.shape
    mask = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
    mask[:, prompt_length:] = True
    if stop_id is not None:
        stops = (tokens[:, prompt_length:] == stop_id).int()
        after = (stops.cumsum(1) - stops) > 0          # strictly after the first stop token
        mask[:, prompt_length:] &= ~after
    return mask


@torch.no_grad()
def sample(model: GPT, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, *,
           temperature: float = 1.0, generator: torch.Generator | None = None, stop: str = "\n") -> Rollout:
    """Continue every prompt by ``max_new_tokens`` sampled tokens; the response ends with the first ``stop``.

    Temperature 1 and no top-k: the samples follow the policy's own distribution, which the
    policy-gradient estimators assume. ``GPT.generate`` keeps a KV cache, so each step feeds one token.
    Prompts of equal length are generated together; when lengths differ, each length is a batch of its
    own and shorter rows are padded on the right (padding is outside the mask, and a causal model's
    outputs at earlier positions do not depend on it).
    """
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p, errors="replace") for p in prompts]
    stop_id = tokenizer.index.get(stop)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    width = max(by_length) + max_new_tokens
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for length, rows in by_length.items():
        idx = torch.tensor([encoded[i] for i in rows], device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, generator=generator)
        tokens[rows, :out.shape[1]] = out
        mask[rows, :out.shape[1]] = response_mask(out, length, stop_id)
    texts = [tokenizer.decode(row[m].tolist()) for row, m in zip(tokens.cpu(), mask.cpu())]
    texts = [t[:-len(stop)] if t.endswith(stop) else t for t in texts]
    return Rollout(tokens, mask, texts, list(prompts))


def forward_with_hidden(model: GPT, tokens: torch.Tensor, module: nn.Module | None = None):
    """The model's logits (B, T, V) and the output (B, T, C) of ``module`` (default: the final hidden
    states, the output of ``ln_f``), from one forward pass: a hook catches that output on its way."""
    caught = {}
    module = model.transformer.ln_f if module is None else module
    handle = module.register_forward_hook(lambda m, i, out: caught.setdefault("h", out))
    try:
        logits, _ = model(tokens)
    finally:
        handle.remove()
    return logits, caught["h"]


# ---------------------------------------------------------------------------
# Reference pieces (the graded exercises' references; switched off in the tests)
# ---------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (over everything, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0 and standard deviation 1 over the masked entries
    (0 elsewhere): PPO's advantage normalisation."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T): entry t is log p(tokens[:, t] | tokens[:, :t]), read from logits[:, t - 1]; entry 0 is 0."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return F.pad(logp, (1, 0))


def sequence_logprob(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): log p(response | prompt), the sum of ``token_logprobs`` over the response tokens."""
    return (token_logprobs(logits, tokens) * mask).sum(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952; InstructGPT's reward loss)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs in which the chosen response scores higher (a tie counts one half)."""
    diff = r_chosen - r_rejected
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """Per-token rewards (B, T): -beta * (logp - ref_logp) on each response token, plus the
    sequence's ``score`` on its last response token (Ziegler et al. 2019; InstructGPT); 0 elsewhere."""
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.long().cumsum(1).argmax(1)           # the last True of each row
    return rewards.index_put((torch.arange(len(score), device=score.device), last),
                             score.to(rewards.dtype), accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last response token = 0 (the episode
    ends); A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = advantages + values),
    both (B, T) and 0 outside ``mask``. Nothing here carries gradients.
    """
    rewards, values = rewards.detach(), values.detach()
    m = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t] * m[:, t], adv
    return advantages, (advantages + values) * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2) -> torch.Tensor:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise: the masked mean of
    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - old_logp)."""
    ratio = torch.exp(logp - old_logp.detach())
    advantages = advantages.detach()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    return -masked_mean(surrogate, mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> torch.Tensor:
    """0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clip(V - old, +-c)."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the distributions that chose the response tokens: logits[:, t - 1] for
    every t where ``mask`` is True."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return masked_mean(entropy, mask[:, 1:])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): mean of -log sigmoid(beta * ((pc - rc) - (pr - rr))), from the
    sequence log-probabilities of the policy and of the frozen reference."""
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return -F.logsigmoid(beta * margin).mean()


def dpo_implicit_reward(policy_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), without gradients."""
    return (beta * (policy_logp - ref_logp)).detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """IPO (Azar et al. 2023): mean of (margin - 1 / (2 beta))^2, margin as in DPO without beta."""
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return ((margin - 1 / (2 * beta)) ** 2).mean()


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> torch.Tensor:
    """The hinge variant (SLiC, Zhao et al. 2023): mean of relu(1 - beta * margin)."""
    margin = (policy_chosen - ref_chosen.detach()) - (policy_rejected - ref_rejected.detach())
    return F.relu(1 - beta * margin).mean()


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024): rewards (G, K), K responses per prompt, each normalised
    within its group: (r - mean) / (std + eps), with the sample standard deviation (``torch.std``)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> torch.Tensor:
    """The GRPO loss (DeepSeekMath, eq. 3), to minimise: per sequence, the mean over its response tokens
    of min(ratio * A, clip(ratio) * A) - beta * KL_t, with KL_t = exp(ref - logp) - (ref - logp) - 1
    (the unbiased k3 estimator); then the mean over sequences, negated. ``advantages`` is (B,)."""
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach()[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    log_ratio_ref = ref_logp.detach() - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
    per_sequence = masked_mean(surrogate - beta * kl, mask, dim=1)
    return -per_sequence.mean()


def reinforce_loss(seq_logp: torch.Tensor, scores: torch.Tensor, baseline: float | torch.Tensor = 0.0) -> torch.Tensor:
    """REINFORCE with a baseline (Williams 1992): mean of -(score - baseline) * log p(response)."""
    return -((scores - baseline).detach() * seq_logp).mean()


@dataclass
class Pieces:
    """The functions a training loop calls: the references by default, yours in the notebook."""

    token_logprobs: Callable = token_logprobs
    sequence_logprob: Callable = sequence_logprob
    bradley_terry_loss: Callable = bradley_terry_loss
    kl_penalised_rewards: Callable = kl_penalised_rewards
    gae: Callable = gae
    ppo_policy_loss: Callable = ppo_policy_loss
    value_loss: Callable = value_loss
    masked_entropy: Callable = masked_entropy
    dpo_loss: Callable = dpo_loss
    grpo_advantages: Callable = grpo_advantages
    grpo_loss: Callable = grpo_loss


def yours_or_reference(yours: Callable, reference: Callable, name: str) -> Callable:
    """``yours``, falling back to ``reference`` (with a note, once) while yours raises NotImplementedError."""
    told = []

    def call(*args, **kwargs):
        try:
            return yours(*args, **kwargs)
        except NotImplementedError:
            if not told:
                print(f"({name} is not written yet: the reference version runs instead)")
                told.append(True)
            return reference(*args, **kwargs)

    call.__name__ = name
    return call


def pieces_from(*functions: Callable, **named: Callable) -> Pieces:
    """A ``Pieces`` holding the functions you pass (each matched to a piece by its name, or passed by
    keyword: ``pieces_from(token_logprobs, gae=my_gae)``), each falling back to the reference while it
    raises NotImplementedError; every piece you do not pass is the reference."""
    defaults = Pieces()
    fields = defaults.__dataclass_fields__
    given = dict(named)
    for function in functions:
        name = getattr(function, "__name__", "")
        if name not in fields:
            raise ValueError(f"{name or function!r} is not a piece ({', '.join(fields)}): pass it by keyword, "
                             f"e.g. pieces_from(gae=...)")
        given[name] = function
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"not pieces: {', '.join(unknown)} (the pieces are {', '.join(fields)})")
    chosen = {name: yours_or_reference(given[name], getattr(defaults, name), name) if callable(given.get(name))
              else getattr(defaults, name) for name in fields}
    return Pieces(**chosen)


def frozen(model: GPT) -> GPT:
    """A copy of ``model`` that never trains: eval mode, no gradients (the reference policy)."""
    copied = copy.deepcopy(model).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def trainable_copy(model: GPT) -> GPT:
    """A copy of ``model`` to train (every parameter requires a gradient), in eval mode until a loop trains it."""
    copied = copy.deepcopy(model).eval()
    for p in copied.parameters():
        p.requires_grad_(True)
    return copied


# ---------------------------------------------------------------------------
# Models: a reward model and a value head
# ---------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A scalar reward on a frozen copy of the policy's backbone (InstructGPT's reward model, in miniature).

    The score of a response is the mean, over its tokens, of a small MLP applied to the hidden state
    after block ``layer``: a sum of per-token contributions, the shape of the gold judge itself
    (VADER adds up the valence of the words it knows). InstructGPT reads the last token's state with
    a linear head instead; on this character model a linear head on the final states (last token and
    mean) reached 54-58 % held-out accuracy, barely above chance, while per-token scores of block 1
    reach 63-64 % (measured while building this phase; a plausible reason, not tested: the early blocks
    still hold which characters were just read, the later ones have moved on to predicting the next).
    The backbone stays frozen: fine-tuning its 0.8 M parameters overfitted the few hundred comparisons
    this phase first used (not measured again with today's two thousand), and a frozen backbone lets the
    head train on states computed once.
    The last layer starts at zero, so every response starts with the same score (loss log 2).
    """

    def __init__(self, backbone: GPT, layer: int = 1, width: int = 64):
        super().__init__()
        self.backbone = frozen(backbone)
        self.layer = min(layer, len(self.backbone.transformer.h) - 1)
        n_embd = backbone.config.n_embd
        self.head = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.head.to(next(self.backbone.parameters()).device)

    @torch.no_grad()
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, n_embd): the hidden states after block ``layer``, from the backbone's own forward pass."""
        return forward_with_hidden(self.backbone, tokens, self.backbone.transformer.h[self.layer])[1]

    def score(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,): the mean over the response tokens (``mask``) of the head's per-token scores."""
        weights = mask.to(features.dtype)
        return (self.head(features)[..., 0] * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(tokens), mask)


class ValueHead(nn.Module):
    """The critic: a small MLP on the policy's final hidden states, read one position earlier.

    ``values[:, t]`` estimates the return from the state just before token t is chosen, computed
    from the hidden state at t - 1 (where the logits that choose token t come from); ``values[:, 0] = 0``.
    The hidden states are detached: the critic learns on the policy's features without pulling them.
    """

    def __init__(self, n_embd: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.pad(self.net(hidden.detach()[:, :-1])[..., 0], (1, 0))


# ---------------------------------------------------------------------------
# Measuring a policy: gold reward, proxy reward and KL to the reference
# ---------------------------------------------------------------------------


@torch.no_grad()
def kl_to_reference(policy: GPT, reference: GPT, rollout: Rollout) -> torch.Tensor:
    """Per sample (B,): sum over the response of log pi(y_t) - log pi_ref(y_t), for samples of the
    policy. Its mean estimates KL(pi || pi_ref) of whole responses, in nats."""
    logp = token_logprobs(policy(rollout.tokens)[0], rollout.tokens)
    ref = token_logprobs(reference(rollout.tokens)[0], rollout.tokens)
    return ((logp - ref) * rollout.mask).sum(-1)


@torch.no_grad()
def evaluate_policy(policy: GPT, reference: GPT, tokenizer, n: int = 128, *, max_new_tokens: int = 32,
                    reward_model: RewardModel | None = None, seed: int = 1234,
                    prompts: Callable = None) -> dict:
    """Gold reward, proxy reward (if a reward model is given), KL to the reference, and a few samples,
    from ``n`` fresh samples of the policy (the same prompts and seed for every policy)."""
    from . import preferences

    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    prompt_list = (prompts or preferences.cheerful_prompts)(n, torch.Generator().manual_seed(seed))
    rollout = sample(policy, tokenizer, prompt_list, max_new_tokens, generator=generator)
    result = {"gold": float(preferences.gold_reward(rollout.texts).mean()),
              "kl": float(kl_to_reference(policy, reference, rollout).mean()),
              "samples": [p + t for p, t in zip(rollout.prompts[:4], rollout.texts[:4])]}
    if reward_model is not None:
        result["proxy"] = float(reward_model(rollout.tokens, rollout.mask).mean())
    return result


# ---------------------------------------------------------------------------
# Training: the reward model
# ---------------------------------------------------------------------------


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def score_pairs(reward_model: RewardModel, pairs, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's scores of the chosen and the rejected responses of ``pairs``, (n,) each."""
    device = next(reward_model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        chosen.append(reward_model(pairs.chosen[sl].to(device), pairs.chosen_mask[sl].to(device)).cpu())
        rejected.append(reward_model(pairs.rejected[sl].to(device), pairs.rejected_mask[sl].to(device)).cpu())
    return torch.cat(chosen), torch.cat(rejected)


def train_reward_model(backbone: GPT, pairs, *, loss_fn: Callable = bradley_terry_loss, steps: int = 300,
                       lr: float = 1e-3, weight_decay: float = 0.1, seed: int = 0,
                       batch_size: int = 256) -> tuple[RewardModel, list]:
    """A ``RewardModel`` on a frozen copy of ``backbone``, its head trained on ``pairs`` with
    ``loss_fn(r_chosen, r_rejected)``: the backbone's states are computed once, then ``steps`` AdamW
    steps on random mini-batches of ``batch_size`` pairs (all of them when there are fewer).
    Returns the model and the loss of every step."""
    torch.manual_seed(seed)
    model = RewardModel(backbone)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        sl = slice(start, start + batch_size)
        chosen.append(model.features(pairs.chosen[sl].to(device)))
        rejected.append(model.features(pairs.rejected[sl].to(device)))
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    chosen_mask, rejected_mask = pairs.chosen_mask.to(device), pairs.rejected_mask.to(device)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        index = (torch.randperm(len(pairs), generator=generator)[:batch_size].to(device)
                 if len(pairs) > batch_size else slice(None))
        loss = loss_fn(model.score(chosen[index], chosen_mask[index]),
                       model.score(rejected[index], rejected_mask[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


# ---------------------------------------------------------------------------
# Training: policy gradient, PPO, DPO, GRPO
# ---------------------------------------------------------------------------


@dataclass
class RLConfig:
    """Sizes and coefficients of one policy-optimisation run."""

    iterations: int = 40
    batch_size: int = 32          # responses per iteration
    max_new_tokens: int = 32
    lr: float = 1e-4
    beta: float = 0.05            # KL coefficient (0: no tie to the reference)
    clip_eps: float = 0.2
    ppo_epochs: int = 2           # passes over each batch of rollouts
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    value_lr: float = 1e-3
    group_size: int = 8           # GRPO: responses per prompt
    eval_every: int = 10
    eval_samples: int = 96
    seed: int = 0


def _clock() -> dict:
    """Training time of a run: wall time since it started, minus the time spent evaluating."""
    return {"start": time.perf_counter(), "eval": 0.0}


def _record(history: list, step: int, policy, reference, tokenizer, config: RLConfig, reward_model=None,
            extra: dict | None = None, prompts=None, clock: dict | None = None) -> None:
    """Evaluate the policy on fresh samples and append a row; ``seconds`` is the training time so far."""
    before = time.perf_counter()
    result = evaluate_policy(policy, reference, tokenizer, config.eval_samples,
                             max_new_tokens=config.max_new_tokens, reward_model=reward_model, prompts=prompts)
    seconds = 0.0
    if clock is not None:
        seconds = before - clock["start"] - clock["eval"]
        clock["eval"] += time.perf_counter() - before
    history.append({"step": step, **result, **(extra or {}), "seconds": round(seconds, 1)})


def reinforce_train(policy: GPT, reference: GPT, tokenizer, score_fn: Callable, config: RLConfig,
                    pieces: Pieces | None = None) -> list:
    """REINFORCE with a running-mean baseline, rewarding ``score_fn(rollout)`` (B,) directly (no KL term):
    the simplest policy gradient. Returns the evaluation history."""
    from . import preferences

    pieces = pieces or Pieces()
    device = next(policy.parameters()).device
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    prompt_gen = torch.Generator().manual_seed(config.seed)
    baseline, history, clock = None, [], _clock()
    _record(history, 0, policy, reference, tokenizer, config, clock=clock)
    for step in runtime.progress(range(1, config.iterations + 1), desc="REINFORCE"):
        rollout = sample(policy, tokenizer, preferences.cheerful_prompts(config.batch_size, prompt_gen),
                         config.max_new_tokens, generator=generator)
        with torch.no_grad():
            scores = score_fn(rollout).to(device).float()
        baseline = float(scores.mean()) if baseline is None else 0.9 * baseline + 0.1 * float(scores.mean())
        policy.train()
        seq_logp = pieces.sequence_logprob(policy(rollout.tokens)[0], rollout.tokens, rollout.mask)
        loss = reinforce_loss(seq_logp, scores, baseline)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        policy.eval()
        if step % config.eval_every == 0 or step == config.iterations:
            _record(history, step, policy, reference, tokenizer, config, clock=clock)
    return history


def ppo_train(policy: GPT, reference: GPT, tokenizer, score_fn: Callable, config: RLConfig,
              pieces: Pieces | None = None, reward_model: RewardModel | None = None,
              on_eval: Callable | None = None) -> list:
    """RLHF with PPO, in place on ``policy``: each iteration samples ``batch_size`` responses, scores them
    with ``score_fn(rollout)`` (B,), turns the scores into per-token rewards with a KL penalty to the
    frozen ``reference``, estimates advantages with GAE and a value head, and takes ``ppo_epochs``
    clipped steps. Evaluates gold reward (and the proxy, given ``reward_model``) and KL every
    ``eval_every`` iterations; returns that history (a list of dicts)."""
    from . import preferences

    pieces = pieces or Pieces()
    device = next(policy.parameters()).device
    torch.manual_seed(config.seed)
    critic = ValueHead(policy.config.n_embd).to(device)
    optimizer = torch.optim.Adam([{"params": policy.parameters(), "lr": config.lr},
                                  {"params": critic.parameters(), "lr": config.value_lr}])
    generator = torch.Generator(device=device).manual_seed(config.seed)
    prompt_gen = torch.Generator().manual_seed(config.seed)
    history, clock = [], _clock()
    _record(history, 0, policy, reference, tokenizer, config, reward_model, clock=clock)
    if on_eval is not None:
        on_eval(history)
    for step in runtime.progress(range(1, config.iterations + 1), desc="PPO"):
        rollout = sample(policy, tokenizer, preferences.cheerful_prompts(config.batch_size, prompt_gen),
                         config.max_new_tokens, generator=generator)
        tokens, mask = rollout.tokens, rollout.mask
        with torch.no_grad():
            logits, hidden = forward_with_hidden(policy, tokens)
            old_logp = pieces.token_logprobs(logits, tokens)
            ref_logp = pieces.token_logprobs(reference(tokens)[0], tokens)
            old_values = critic(hidden)
            scores = score_fn(rollout).to(device).float()
            rewards = pieces.kl_penalised_rewards(scores, old_logp, ref_logp, mask, config.beta)
            advantages, returns = pieces.gae(rewards, old_values, mask, config.gamma, config.lam)
            advantages = whiten(advantages, mask)
        policy.train()
        for _ in range(config.ppo_epochs):
            logits, hidden = forward_with_hidden(policy, tokens)
            logp = pieces.token_logprobs(logits, tokens)
            loss = (pieces.ppo_policy_loss(logp, old_logp, advantages, mask, config.clip_eps)
                    + config.vf_coef * pieces.value_loss(critic(hidden), old_values, returns, mask, config.clip_eps))
            if config.ent_coef:
                loss = loss - config.ent_coef * pieces.masked_entropy(logits, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
        policy.eval()
        if step % config.eval_every == 0 or step == config.iterations:
            _record(history, step, policy, reference, tokenizer, config, reward_model,
                    {"train_score": float(scores.mean())}, clock=clock)
            if on_eval is not None:
                on_eval(history)
    return history


@torch.no_grad()
def _pair_logprobs(model: GPT, pairs, index, device, pieces: Pieces):
    c = pieces.sequence_logprob(model(pairs.chosen[index].to(device))[0], pairs.chosen[index].to(device),
                                pairs.chosen_mask[index].to(device))
    r = pieces.sequence_logprob(model(pairs.rejected[index].to(device))[0], pairs.rejected[index].to(device),
                                pairs.rejected_mask[index].to(device))
    return c, r


def dpo_train(policy: GPT, reference: GPT, tokenizer, pairs, *, beta: float = 0.1, epochs: int = 2,
              batch_size: int = 32, lr: float = 1e-4, loss_fn: Callable | None = None,
              pieces: Pieces | None = None, eval_every: int = 10, eval_samples: int = 96,
              max_new_tokens: int = 32, seed: int = 0, reward_model: RewardModel | None = None) -> list:
    """DPO in place on ``policy`` over ``pairs`` (``preferences.PreferencePairs``), with the frozen
    ``reference``. ``loss_fn(pc, pr, rc, rr, beta)`` defaults to ``pieces.dpo_loss``. Evaluates gold
    reward and KL every ``eval_every`` steps; the history also records the preference accuracy of the
    implicit reward on the batch."""
    pieces = pieces or Pieces()
    loss_fn = loss_fn or pieces.dpo_loss
    device = next(policy.parameters()).device
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    config = RLConfig(eval_samples=eval_samples, max_new_tokens=max_new_tokens)
    history, clock, step = [], _clock(), 0
    _record(history, 0, policy, reference, tokenizer, config, reward_model, clock=clock)
    total = epochs * math.ceil(len(pairs) / batch_size)
    bar = runtime.progress(total=total, desc="DPO")
    for _ in range(epochs):
        for index in _batches(len(pairs), batch_size, generator):
            ref_c, ref_r = _pair_logprobs(reference, pairs, index, device, pieces)
            policy.train()
            chosen = pairs.chosen[index].to(device)
            rejected = pairs.rejected[index].to(device)
            pc = pieces.sequence_logprob(policy(chosen)[0], chosen, pairs.chosen_mask[index].to(device))
            pr = pieces.sequence_logprob(policy(rejected)[0], rejected, pairs.rejected_mask[index].to(device))
            loss = loss_fn(pc, pr, ref_c, ref_r, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            policy.eval()
            step += 1
            bar.update(1)
            if step % eval_every == 0 or step == total:
                accuracy = preference_accuracy(pc.detach() - ref_c, pr.detach() - ref_r)
                _record(history, step, policy, reference, tokenizer, config, reward_model,
                        {"loss": loss.item(), "batch_accuracy": accuracy}, clock=clock)
    bar.close()
    return history


def grpo_train(policy: GPT, reference: GPT, tokenizer, task, config: RLConfig,
               pieces: Pieces | None = None) -> list:
    """GRPO in place on ``policy`` for a verifiable ``task`` (``preferences.VerifiableTask``): each iteration
    samples ``group_size`` responses for each of ``batch_size // group_size`` prompts, rewards each 1 or 0
    with ``task.check(prompt, response)``, normalises the rewards within each group (no value head), and
    takes ``ppo_epochs`` clipped steps with a KL penalty to ``reference``. Returns the history of accuracy
    (on fresh samples of ``eval_samples`` prompts) and KL."""
    pieces = pieces or Pieces()
    device = next(policy.parameters()).device
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    prompt_gen = torch.Generator().manual_seed(config.seed)
    groups, k = max(1, config.batch_size // config.group_size), config.group_size
    n_new = task.max_new_tokens or config.max_new_tokens
    history, clock = [], _clock()

    def record(step, extra=None):
        before = time.perf_counter()
        eval_gen = torch.Generator(device=device).manual_seed(4321)
        rollout = sample(policy, tokenizer, task.prompts(config.eval_samples, torch.Generator().manual_seed(4321)),
                         n_new, generator=eval_gen, stop=task.stop)
        accuracy = sum(task.check(p, t) for p, t in zip(rollout.prompts, rollout.texts)) / len(rollout.texts)
        history.append({"step": step, "accuracy": accuracy,
                        "kl": float(kl_to_reference(policy, reference, rollout).mean()),
                        "samples": [f"{task.show(p)} -> {t}" for p, t in zip(rollout.prompts[:4], rollout.texts[:4])],
                        **(extra or {}), "seconds": round(before - clock["start"] - clock["eval"], 1)})
        clock["eval"] += time.perf_counter() - before

    record(0)
    for step in runtime.progress(range(1, config.iterations + 1), desc="GRPO"):
        prompt_list = [p for p in task.prompts(groups, prompt_gen) for _ in range(k)]
        rollout = sample(policy, tokenizer, prompt_list, n_new, generator=generator, stop=task.stop)
        tokens, mask = rollout.tokens, rollout.mask
        rewards = torch.tensor([float(task.check(p, t)) for p, t in zip(rollout.prompts, rollout.texts)], device=device)
        advantages = pieces.grpo_advantages(rewards.view(groups, k)).reshape(-1)
        with torch.no_grad():
            old_logp = pieces.token_logprobs(policy(tokens)[0], tokens)
            ref_logp = pieces.token_logprobs(reference(tokens)[0], tokens)
        policy.train()
        for _ in range(config.ppo_epochs):
            logp = pieces.token_logprobs(policy(tokens)[0], tokens)
            loss = pieces.grpo_loss(logp, old_logp, ref_logp, advantages, mask, config.clip_eps, config.beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
        policy.eval()
        if step % config.eval_every == 0 or step == config.iterations:
            record(step, {"train_accuracy": float(rewards.mean())})
    return history


@torch.no_grad()
def best_of_n(policy: GPT, reference: GPT, tokenizer, reward_model: RewardModel, ns: Sequence[int] = (1, 2, 4, 8, 16),
              n_prompts: int = 64, max_new_tokens: int = 32, seed: int = 7) -> list:
    """Best-of-n sampling against the proxy: for each n, the response the reward model scores highest
    among n samples. Its KL to the policy is known exactly: log n - (n - 1) / n (Stiennon et al. 2020).
    Returns one row per n with gold and proxy rewards of the picked responses."""
    from . import preferences

    device = next(policy.parameters()).device
    n_max = max(ns)
    prompts = preferences.cheerful_prompts(n_prompts, torch.Generator().manual_seed(seed))
    rollout = sample(policy, tokenizer, [p for p in prompts for _ in range(n_max)], max_new_tokens,
                     generator=torch.Generator(device=device).manual_seed(seed))
    proxy = reward_model(rollout.tokens, rollout.mask).cpu().view(n_prompts, n_max)
    gold = preferences.gold_reward(rollout.texts).view(n_prompts, n_max)
    rows = []
    for n in ns:
        best = proxy[:, :n].argmax(1)
        rows.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                     "proxy": float(proxy[:, :n].gather(1, best[:, None]).mean()),
                     "gold": float(gold[:, :n].gather(1, best[:, None]).mean())})
    return rows


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def overoptimisation_figure(runs: dict, title: str = "Optimising the learned reward: proxy and gold against KL"):
    """Two panels over KL (nats): the proxy (learned) reward and the gold reward, one line per run.

    ``runs`` maps a name to a history (list of dicts with ``kl``, ``proxy``, ``gold``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["proxy: the reward model's score", "gold: VADER sentiment"],
                        horizontal_spacing=0.1)
    colors = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a"]
    for i, (name, history) in enumerate(runs.items()):
        rows = [r for r in history if "proxy" in r]
        kl = [max(r["kl"], 0.0) for r in rows]
        for col, key in ((1, "proxy"), (2, "gold")):
            fig.add_trace(go.Scatter(x=kl, y=[r[key] for r in rows], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1,
                                     line=dict(color=colors[i % len(colors)])), row=1, col=col)
    fig.update_xaxes(title="KL(policy || reference), nats")
    return plots.style(fig, title, height=400)


def frontier_figure(runs: dict, title: str = "Gold reward against KL to the reference"):
    """The reward-versus-KL frontier: every evaluation of every run as a point (the DPO paper's
    Figure 2, in miniature). ``runs`` maps a name to a history with ``kl`` and ``gold``."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, history in runs.items():
        fig.add_trace(go.Scatter(x=[max(r["kl"], 0.0) for r in history], y=[r["gold"] for r in history],
                                 mode="lines+markers", name=name,
                                 text=[f"step {r.get('step', r.get('n'))}" for r in history]))
    fig.update_layout(xaxis_title="KL(policy || reference), nats per response",
                      yaxis_title="gold reward (mean VADER compound)")
    return plots.style(fig, title, height=420)


def history_figure(history: list, keys: Sequence[str], title: str, yaxis_title: str = ""):
    """Lines of ``keys`` of a history against the step."""
    return plots.line_chart([r["step"] for r in history], {k: [r.get(k) for r in history] for k in keys},
                            title=title, xaxis_title="step", yaxis_title=yaxis_title, height=360)


def show_samples(history: list, label: str = "") -> None:
    """Print the samples of the first and the last evaluation of a history."""
    for row in (history[0], history[-1]):
        print(f"--- {label} step {row['step']} ---")
        for text in row["samples"]:
            print("   ", text.replace("\n", " | "))
