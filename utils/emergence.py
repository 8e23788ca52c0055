"""Phase 4 helpers: small training experiments of sections 7 and 8 (ungraded demonstrations).

* in-context learning of linear functions (Garg et al. 2022): ``linear_regression_prompts``,
  ``InContextRegressor``, ``train_in_context``, ``in_context_errors``
* induction heads (Olsson et al. 2022) in a two-layer attention-only model: ``repeated_sequences``,
  ``AttentionOnly``, ``train_induction``
* data order under imbalance (after Choi et al. 2023): ``two_languages``, ``tagged_sequences``,
  ``data_orders``, ``train_in_order``, ``data_order_experiment``, ``data_order_summary``,
  ``data_order_figure``

Each trains small models in seconds to about a minute on a CPU; the results are illustrations, not
measurements of large models.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots
from .transformer import GPT, Block, GPTConfig

# ---------------------------------------------------------------------------
# In-context learning of linear regression (Garg, Tsipras, Liang & Valiant 2022)
# ---------------------------------------------------------------------------


def linear_regression_prompts(batch: int, n_points: int, dim: int, generator: torch.Generator | None = None):
    """Prompts ``x_1, y_1, ..., x_k, y_k`` for random linear functions y = w . x (w, x standard normal).

    Returns (xs (B, k, dim), ys (B, k)).
    """
    w = torch.randn(batch, dim, 1, generator=generator)
    xs = torch.randn(batch, n_points, dim, generator=generator)
    return xs, (xs @ w).squeeze(-1)


class InContextRegressor(nn.Module):
    """A GPT (the course's pre-LN blocks) that reads (x, y) pairs as vectors and predicts each y from
    the pairs before it and its x: tokens alternate x_i (as [x_i, 0]) and y_i (as [0, ..., 0, y_i])."""

    def __init__(self, dim: int, n_points: int, n_embd: int = 64, n_layer: int = 3, n_head: int = 4):
        super().__init__()
        config = GPTConfig(vocab_size=1, block_size=2 * n_points, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        self.read_in = nn.Linear(dim + 1, n_embd)
        self.positions = nn.Parameter(torch.randn(2 * n_points, n_embd) * 0.02)
        self.blocks = nn.ModuleList(Block(config) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.read_out = nn.Linear(n_embd, 1)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Predictions (B, k) of each y_i from x_1, y_1, ..., x_i."""
        batch, k, dim = xs.shape
        x_tokens = torch.cat([xs, xs.new_zeros(batch, k, 1)], -1)
        y_tokens = torch.cat([xs.new_zeros(batch, k, dim), ys.unsqueeze(-1)], -1)
        tokens = torch.stack([x_tokens, y_tokens], 2).reshape(batch, 2 * k, dim + 1)
        h = self.read_in(tokens) + self.positions[: 2 * k]
        for block in self.blocks:
            h = block(h)
        return self.read_out(self.norm(h))[:, 0::2, 0]      # read at the x tokens


def train_in_context(model: InContextRegressor, dim: int, n_points: int, steps: int, batch: int = 64,
                     lr: float = 1e-3, seed: int = 0, on_step: Callable | None = None, device=None) -> list[float]:
    """Train on fresh random functions every step (mean squared error over every position)."""
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        xs, ys = linear_regression_prompts(batch, n_points, dim, generator)
        xs, ys = xs.to(device), ys.to(device)
        loss = F.mse_loss(model(xs, ys), ys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def in_context_errors(model: InContextRegressor | None, dim: int, n_points: int, batch: int = 1000, seed: int = 1,
                      device=None) -> dict[str, list[float]]:
    """Mean squared error of the prediction of y_i after i - 1 examples, for the model and for two
    baselines: least squares on the examples so far (minimum norm when i - 1 < dim, which is then the
    posterior mean of w) and guessing the mean of y, 0, whatever the prompt."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = linear_regression_prompts(batch, n_points, dim, generator)
    result = {"guess the mean (0)": (ys ** 2).mean(0).tolist()}
    least = []
    for i in range(n_points):
        if i == 0:
            least.append(float((ys[:, 0] ** 2).mean()))
            continue
        w = torch.linalg.pinv(xs[:, :i]) @ ys[:, :i].unsqueeze(-1)
        least.append(float(((xs[:, i:i + 1] @ w).squeeze(-1).squeeze(-1) - ys[:, i]).pow(2).mean()))
    result["least squares on the examples"] = least
    if model is not None:
        model.eval()
        device = device or next(model.parameters()).device
        predictions = model(xs.to(device), ys.to(device)).cpu()
        result["transformer, in context"] = ((predictions - ys) ** 2).mean(0).tolist()
    return result


def in_context_figure(errors: dict[str, list[float]], dim: int):
    """The errors of ``in_context_errors`` divided by ``dim`` (Garg et al.'s normalisation: guessing
    the mean scores about 1), against the number of examples before the query."""
    figure = plots.line_chart(list(range(len(next(iter(errors.values()))))),
                              {name: [v / dim for v in values] for name, values in errors.items()},
                              title=f"In-context learning of linear functions in {dim} dimensions",
                              xaxis_title="examples in the prompt before the query",
                              yaxis_title="squared error / dimension", height=380)
    figure.add_vline(x=dim, line_dash="dot", annotation_text="examples = dimension")
    return figure


# ---------------------------------------------------------------------------
# Induction heads (Olsson et al. 2022)
# ---------------------------------------------------------------------------


def repeated_sequences(batch: int, half: int, vocab_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random tokens followed by the same tokens again, (B, 2 * half): the second half is predictable
    only by looking back for the current token's earlier occurrence and copying what followed it."""
    first = torch.randint(0, vocab_size, (batch, half), generator=generator)
    return torch.cat([first, first], 1)


class AttentionOnly(nn.Module):
    """A transformer without MLPs (Elhage et al. 2021): embeddings, ``n_layer`` causal attention layers
    with residuals, an unembedding. ``attention[l]`` holds the last forward pass's weights of layer l,
    (B, n_head, T, T)."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int = 64, n_layer: int = 2, n_head: int = 2):
        super().__init__()
        self.n_head = n_head
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(block_size, n_embd)
        self.qkv = nn.ModuleList(nn.Linear(n_embd, 3 * n_embd, bias=False) for _ in range(n_layer))
        self.out = nn.ModuleList(nn.Linear(n_embd, n_embd, bias=False) for _ in range(n_layer))
        self.unembed = nn.Linear(n_embd, vocab_size, bias=False)
        self.attention: list[torch.Tensor] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        batch, length = idx.shape
        h = self.embed(idx) + self.positions(torch.arange(length, device=idx.device))
        mask = torch.ones(length, length, dtype=torch.bool, device=idx.device).tril()
        self.attention = []
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in qkv(h).chunk(3, -1))
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            self.attention.append(weights.detach())
            h = h + out((weights @ v).transpose(1, 2).reshape(batch, length, -1))
        return self.unembed(h)


def train_induction(model: AttentionOnly, max_half: int, vocab_size: int, steps: int, batch: int = 32,
                    lr: float = 3e-3, seed: int = 0, device=None) -> dict[str, list[float]]:
    """Train next-token prediction on repeated sequences whose length changes every batch (from
    ``max_half // 2`` to ``max_half`` before the repeat), so that no fixed offset finds the earlier
    occurrence: only looking up the current token does. Records the loss on each half (the first
    half is random: its loss stays near log(vocab_size))."""
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    record = {"first half (random)": [], "second half (repeated)": []}
    for _ in range(steps):
        half = int(torch.randint(max_half // 2, max_half + 1, (1,), generator=generator))
        seq = repeated_sequences(batch, half, vocab_size, generator).to(device)
        logits = model(seq[:, :-1])
        losses = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses = losses.detach()
        record["first half (random)"].append(float(losses[:, : half - 1].mean()))
        record["second half (repeated)"].append(float(losses[:, half:].mean()))
    return record


def induction_score(model: AttentionOnly, half: int, vocab_size: int, seed: int = 5) -> torch.Tensor:
    """Per layer and head: the mean attention from each second-half position t to position t - half + 1,
    the token after the earlier occurrence of the current token (what an induction head attends to)."""
    seq = repeated_sequences(64, half, vocab_size, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(seq.to(next(model.parameters()).device))
    scores = []
    for weights in model.attention:
        rows = torch.arange(half, 2 * half)
        scores.append(weights[:, :, rows, rows - half + 1].mean((0, 2)).cpu())
    return torch.stack(scores)


# ---------------------------------------------------------------------------
# Data order under imbalance (after Choi et al. 2023)
# ---------------------------------------------------------------------------


def two_languages(vocab_size: int = 16, closeness: float = 0.4, concentration: float = 0.3, seed: int = 0):
    """Two "languages" over the same symbols: random first-order Markov chains (``scaling.MarkovSource``)
    whose next-symbol tables share a part ``closeness`` (B's table is ``closeness * A + (1 - closeness) *
    Q``, Q another random table), so that learning one helps with the other. Returns (A, B); each knows
    its entropy rate, the loss no model can beat on it."""
    from .scaling import MarkovSource, entropy_rate

    high = MarkovSource(vocab_size=vocab_size, order=1, concentration=concentration, seed=seed)
    low = MarkovSource(vocab_size=vocab_size, order=1, concentration=concentration, seed=seed + 1000)
    low.table = closeness * high.table + (1 - closeness) * low.table
    low.entropy = entropy_rate(low.first_order_matrix())
    return high, low


def tagged_sequences(source, tag: int, count: int, length: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` independent stretches of ``length`` symbols of ``source``, each after a language tag
    (token ``source.vocab_size + tag``, as multilingual translation marks the target language):
    (count, 1 + length)."""
    body = source.sample(count * length, generator, streams=count).view(count, length)
    return torch.cat([torch.full((count, 1), source.vocab_size + tag, dtype=torch.long), body], 1)


def data_orders(n_high: int, n_low: int, first: float = 0.5, generator: torch.Generator | None = None) -> dict:
    """Three orders of the same ``n_high + n_low`` examples (indices: high-resource first, then low):

    * ``"mixed"``: all of them shuffled together (static sampling, the low-resource share constant);
    * ``"high first, then mixed"``: a fraction ``first`` of all steps on high-resource examples only,
      then the remaining high-resource examples shuffled with every low-resource one (Choi et al.);
    * ``"high, then low"``: every high-resource example, then every low-resource one (plain fine-tuning).
    """
    total = n_high + n_low
    head = min(int(first * total), n_high)
    high = torch.randperm(n_high, generator=generator)
    low = n_high + torch.randperm(n_low, generator=generator)
    rest = torch.cat([high[head:], low])
    return {"mixed": torch.randperm(total, generator=generator),
            "high first, then mixed": torch.cat([high[:head], rest[torch.randperm(len(rest), generator=generator)]]),
            "high, then low": torch.cat([high, low])}


@torch.no_grad()
def _excess_losses(model, sets: dict, floors: dict) -> dict:
    """Cross-entropy above each set's entropy rate, on every symbol after the first (whose prediction
    from the tag alone cannot reach the rate)."""
    model.eval()
    out = {}
    for name, x in sets.items():
        logits, _ = model(x[:, :-1])
        out[name] = float(F.cross_entropy(logits[:, 1:].transpose(1, 2), x[:, 2:])) - floors[name]
    model.train()
    return out


def train_in_order(examples: torch.Tensor, order: torch.Tensor, batch: int, sets: dict, floors: dict, *,
                   n_embd: int = 32, n_layer: int = 2, n_head: int = 2, lr: float = 3e-3, seed: int = 0,
                   eval_every: int = 25, device=None) -> dict:
    """Train a small GPT on ``examples[order]``, ``batch`` examples per step, each example exactly once
    in that order, with the same warmup + cosine schedule whatever the order. Every ``eval_every``
    steps, the loss above the entropy rate on each of ``sets`` (name -> sequences). Returns
    {"step": [...], name: [...] for each set}."""
    device = device or torch.device("cpu")
    steps = len(order) // batch
    vocab = int(examples.max()) + 1
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=examples.shape[1] - 1, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    def lr_factor(step: int) -> float:      # linear warmup, then cosine decay to a tenth
        return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    sets = {name: x.to(device) for name, x in sets.items()}
    record = {"step": [], **{name: [] for name in sets}}
    data = examples[order].to(device)
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            record["step"].append(step)
            for name, value in _excess_losses(model, sets, floors).items():
                record[name].append(value)
        if step == steps:
            break
        x = data[step * batch:(step + 1) * batch]
        _, loss = model(x[:, :-1], x[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return record


def data_order_experiment(*, steps: int = 250, batch: int = 32, length: int = 32, low_unique: int = 48,
                          low_repeats: int = 8, first: float = 0.5, seeds: Sequence[int] = (0,),
                          closeness: float = 0.4, eval_every: int = 25, eval_sequences: int = 256, device=None,
                          on_run: Callable | None = None, **model_kwargs) -> dict:
    """For each seed: two related languages, a large high-resource set (every example new) and a small
    low-resource one (``low_unique`` sequences, each repeated ``low_repeats`` times), trained in the
    three orders of ``data_orders``. Losses are measured above each language's entropy rate on fresh
    held-out text (``"high"``, ``"low"``: ``eval_sequences`` each) and on the low-resource training
    sequences (``"low, seen"``, where memorising shows). Returns {"runs": {order: [record per seed]},
    "share": the low-resource share of the examples, and the settings "first", "low_unique",
    "low_repeats"}. The defaults are the notebook's (section 8)."""
    runs: dict[str, list] = {}
    n_low = low_unique * low_repeats
    n_high = steps * batch - n_low
    if n_high <= 0:
        raise ValueError("the low-resource examples fill every step: lower low_unique * low_repeats")
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        high_lang, low_lang = two_languages(closeness=closeness, seed=seed)
        high = tagged_sequences(high_lang, 0, n_high, length, generator)
        low = tagged_sequences(low_lang, 1, low_unique, length, generator)
        examples = torch.cat([high, low.repeat(low_repeats, 1)])
        sets = {"high": tagged_sequences(high_lang, 0, eval_sequences, length, generator),
                "low": tagged_sequences(low_lang, 1, eval_sequences, length, generator), "low, seen": low}
        floors = {"high": high_lang.entropy, "low": low_lang.entropy, "low, seen": low_lang.entropy}
        for name, order in data_orders(n_high, n_low, first, generator).items():
            record = train_in_order(examples, order, batch, sets, floors, seed=seed, eval_every=eval_every,
                                    device=device, **model_kwargs)
            runs.setdefault(name, []).append(record)
            if on_run is not None:
                on_run(name, seed, record)
    return {"runs": runs, "share": n_low / (n_low + n_high), "first": first, "low_unique": low_unique,
            "low_repeats": low_repeats}


def data_order_summary(result: dict) -> dict:
    """Per order: the final loss above the entropy rate on each set, as (mean, spread) over seeds
    (spread = half the range: with two or three seeds, a rough error bar)."""
    summary = {}
    for name, records in result["runs"].items():
        summary[name] = {}
        for key in ("high", "low", "low, seen"):
            finals = [r[key][-1] for r in records]
            summary[name][key] = (sum(finals) / len(finals), (max(finals) - min(finals)) / 2)
    return summary


def data_order_figure(result: dict):
    """Loss above the entropy rate on held-out low-resource text (solid) and high-resource text
    (dotted) during training, one colour per order, the mean over seeds."""
    import plotly.graph_objects as go

    figure = go.Figure()
    colours = ["#1f77b4", "#d62728", "#7f7f7f"]
    for colour, (name, records) in zip(colours, result["runs"].items()):
        steps = records[0]["step"]
        for key, dash in (("low", "solid"), ("high", "dot")):
            mean = [sum(r[key][i] for r in records) / len(records) for i in range(len(steps))]
            figure.add_trace(go.Scatter(x=steps, y=mean, name=f"{name}: {'low' if key == 'low' else 'high'}-resource",
                                        line=dict(color=colour, dash=dash)))
    first_step = result["first"] * records[0]["step"][-1]
    figure.add_vline(x=first_step, line_dash="dash", annotation_text="low-resource data starts (high first)")
    figure.update_layout(xaxis_title="training step", yaxis_title="loss above the entropy rate (nats)")
    return plots.style(figure, title="The same examples in three orders (mean over seeds)", height=420)
