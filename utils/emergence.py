"""Phase 4 helpers: what changes with scale, in miniature (ungraded demonstrations).

* in-context learning of linear functions (Garg et al. 2022): ``linear_regression_prompts``,
  ``InContextRegressor``, ``train_in_context``, ``in_context_errors``
* induction heads (Olsson et al. 2022) in a two-layer attention-only model: ``repeated_sequences``,
  ``AttentionOnly``, ``train_induction``

Each trains a small model in seconds (induction heads) to minutes (in-context regression, which the
notebook describes but does not run) on a CPU; the results are illustrations, not measurements of
large models.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots
from .transformer import Block, GPTConfig

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
    baselines: least squares on the examples so far (minimum norm when i - 1 < dim) and predicting 0."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = linear_regression_prompts(batch, n_points, dim, generator)
    result = {"predict 0": (ys ** 2).mean(0).tolist()}
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
    figure = plots.line_chart(list(range(len(next(iter(errors.values()))))), errors,
                              title=f"In-context learning of linear functions in {dim} dimensions",
                              xaxis_title="examples in the prompt before the query",
                              yaxis_title="squared error of the prediction", height=380)
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
