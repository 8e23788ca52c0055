"""Phase 2 ablations: which parts of the block matter, measured on the same small training budget.

One small character-level GPT on the course's Shakespeare corpus (``utils.pretraining``), trained with
one recipe (AdamW, warm-up then cosine decay, gradient clipping, the same batches in the same order),
changing one thing at a time:

* ``"GPT-2 block"``: pre-LN, learned positions, GELU MLP 4d wide (the reference GPT's block)
* ``"no positions"``: nothing tells the model where a token is but the causal mask (Haviv et al. 2022)
* ``"RoPE"``: rotary positions on the queries and keys instead of the learned table
* ``"post-LN"``: the LayerNorm after each residual addition (Vaswani et al. 2017), no final LayerNorm
* ``"SiLU MLP"``: the GELU replaced by SiLU, still 4d wide and not gated
* ``"SwiGLU MLP"``: the gated SiLU of Shazeer (2020), 8d/3 wide, so that it has the MLP's parameter count

``run_ablations`` trains them and returns their validation losses (``unigram_loss`` is the score of a model
that ignores the context, ``corpus`` the data); ``scripts/make_ablations.py`` runs it
with a larger budget and several seeds and writes ``utils/data/phase2_ablations.json``, which
``load_shipped`` reads and ``ablation_figure`` draws. ``VariantGPT`` is the model, ``train_variant`` one run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots, runtime
from .transformer import apply_rope, one_thread_on_cpu

SHIPPED_FILE = Path(__file__).resolve().parent / "data" / "phase2_ablations.json"

VARIANTS = {
    "GPT-2 block": dict(),
    "no positions": dict(positions="none"),
    "RoPE": dict(positions="rope"),
    "post-LN": dict(norm="post"),
    "SiLU MLP": dict(mlp="silu"),
    "SwiGLU MLP": dict(mlp="swiglu"),
}


@dataclass
class AblationConfig:
    """The model size and the training recipe, shared by every variant."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    batch_size: int = 32
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 60
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_batches: int = 20


class _Attention(nn.Module):
    def __init__(self, d: int, n_head: int, rope: bool):
        super().__init__()
        self.n_head, self.rope = n_head, rope
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=-1))
        if self.rope:
            positions = torch.arange(T, device=x.device)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _MLP(nn.Module):
    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            hidden = int(8 * d / 3)
            self.w_gate, self.w_up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
            self.c_proj = nn.Linear(hidden, d, bias=False)
        else:
            self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.c_proj(F.silu(self.w_gate(x)) * self.w_up(x))
        h = self.c_fc(x)
        return self.c_proj(F.silu(h) if self.kind == "silu" else F.gelu(h, approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int, positions: str, norm: str, mlp: str):
        super().__init__()
        self.post = norm == "post"
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, n_head, rope=positions == "rope")
        self.mlp = _MLP(d, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VariantGPT(nn.Module):
    """A small GPT with one part swapped: ``positions`` ``"learned"``, ``"none"`` or ``"rope"``; ``norm``
    ``"pre"`` or ``"post"``; ``mlp`` ``"gelu"``, ``"silu"`` or ``"swiglu"``. Weights tied and initialised as
    the reference GPT's. ``model(idx, targets)`` returns ``(logits, loss)``."""

    def __init__(self, vocab_size: int, config: AblationConfig, positions: str = "learned", norm: str = "pre",
                 mlp: str = "gelu"):
        super().__init__()
        if positions not in ("learned", "none", "rope") or norm not in ("pre", "post") or mlp not in ("gelu", "silu", "swiglu"):
            raise ValueError(f"unknown variant: positions={positions!r}, norm={norm!r}, mlp={mlp!r}")
        d = config.n_embd
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d) if positions == "learned" else None
        self.h = nn.ModuleList(_Block(d, config.n_head, positions, norm, mlp) for _ in range(config.n_layer))
        # Post-LN ends on a LayerNorm already; pre-LN leaves the residual stream unnormalised.
        self.ln_f = nn.LayerNorm(d) if norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def corpus(val_fraction: float = 0.1):
    """The character-level Shakespeare corpus as ``(train_ids, val_ids, vocab_size)`` (no download)."""
    from . import pretraining

    text = pretraining.shakespeare_text()
    tokenizer = pretraining.CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = pretraining.train_val_split(ids, val_fraction)
    return train_ids, val_ids, tokenizer.vocab_size


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy on the validation text of the character frequencies of the training text: what a
    model that ignores the context scores (the bar every variant must clear)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0  # add-one: no character has probability 0
    log_p = (counts / counts.sum()).log()
    return float(-log_p[val_ids].mean())


def _batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    window = starts[:, None] + torch.arange(block_size + 1)
    chunk = data[window]
    return chunk[:, :-1], chunk[:, 1:]


def _lr(step: int, config: AblationConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def validation_loss(model: nn.Module, val_ids: torch.Tensor, config: AblationConfig, device, seed: int = 1234) -> float:
    """Mean cross-entropy (nats per character) on ``config.eval_batches`` fixed batches of the validation text."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(config.eval_batches):
        x, y = (t.to(device) for t in _batch(val_ids, config.batch_size, config.block_size, generator))
        total += model(x, y)[1].item()
    model.train(was_training)
    return total / config.eval_batches


def train_variant(name: str, train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int,
                  config: AblationConfig, seed: int = 0, device=None, on_step: Callable | None = None) -> dict:
    """Train variant ``name`` of ``VARIANTS`` with the shared recipe; return its validation loss and more.

    The initialisation and the batches depend only on ``seed``: every variant sees the same data in the
    same order. ``on_step(name, step, loss)`` is called after every step.
    """
    device = runtime.get_device() if device is None else torch.device(device)
    torch.manual_seed(seed)
    model = VariantGPT(vocab_size, config, **VARIANTS[name]).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config)
        x, y = (t.to(device) for t in _batch(train_ids, config.batch_size, config.block_size, generator))
        loss = model(x, y)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(name, step, losses[-1])
    seconds = time.perf_counter() - start
    return dict(variant=name, seed=seed, steps=config.steps, params=sum(p.numel() for p in model.parameters()),
                train_loss=sum(losses[-20:]) / max(1, len(losses[-20:])), val_loss=validation_loss(model, val_ids, config, device),
                seconds=seconds, losses=losses)


def run_ablations(config: AblationConfig, variants: Sequence[str] = tuple(VARIANTS), seeds: Sequence[int] = (0,),
                  data=None, device=None, on_step: Callable | None = None, log: Callable | None = None) -> list[dict]:
    """Train every variant for every seed; return one result per run (see ``train_variant``).
    On a CPU the runs use one thread (the fastest way for models this small on a shared machine)."""
    train_ids, val_ids, vocab_size = corpus() if data is None else data
    device = runtime.get_device() if device is None else torch.device(device)
    results = []
    with one_thread_on_cpu(device):
        for seed in seeds:
            for name in variants:
                result = train_variant(name, train_ids, val_ids, vocab_size, config, seed, device, on_step)
                results.append(result)
                if log is not None:
                    log(f"{name:14s} seed {seed}: val loss {result['val_loss']:.4f} ({result['seconds']:.0f} s)")
    return results


def summarise(results: Sequence[dict]) -> dict[str, dict]:
    """Per variant: mean validation loss, the lowest and highest over seeds, the number of seeds."""
    table: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in results):
        values = [r["val_loss"] for r in results if r["variant"] == name]
        table[name] = dict(mean=sum(values) / len(values), low=min(values), high=max(values), seeds=len(values),
                           params=next(r["params"] for r in results if r["variant"] == name))
    return table


def save_shipped(results: Sequence[dict], config: AblationConfig, path=SHIPPED_FILE, **metadata) -> None:
    """Write the runs (without their loss curves) and the recipe as JSON."""
    runs = [{k: v for k, v in r.items() if k != "losses"} for r in results]
    Path(path).write_text(json.dumps(dict(config=asdict(config), runs=runs, **metadata), indent=1) + "\n")


def load_shipped(path=SHIPPED_FILE) -> dict:
    """The shipped measurements: ``{"config", "runs", ...}`` as written by ``scripts/make_ablations.py``."""
    return json.loads(Path(path).read_text())


def ablation_figure(table: dict[str, dict], title: str):
    """Horizontal bars of the mean validation loss per variant, with the range over seeds as error bars."""
    import plotly.graph_objects as go

    names = list(table)
    means = [table[n]["mean"] for n in names]
    fig = go.Figure(go.Bar(
        y=names, x=means, orientation="h", text=[f"{m:.3f}" for m in means], textposition="outside",
        error_x=dict(type="data", symmetric=False, array=[table[n]["high"] - table[n]["mean"] for n in names],
                     arrayminus=[table[n]["mean"] - table[n]["low"] for n in names])))
    low, high = min(t["low"] for t in table.values()), max(t["high"] for t in table.values())
    pad = max(0.02, 0.3 * (high - low))
    fig.update_xaxes(title="validation loss (nats per character, lower is better)", range=[low - pad, high + 2 * pad])
    fig.update_yaxes(autorange="reversed")
    return plots.style(fig, title=title, height=80 + 45 * len(names))
