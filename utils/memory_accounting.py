"""Phase 7: what one rank holds in memory, measured and by formula.

* ``memory_report`` counts the bytes a rank really holds (parameters, gradients, optimizer state,
  activations; only its own shard of a sharded tensor); ``memory_figure`` draws the reports of
  all ranks side by side; ``PeakMemory`` measures the most a rank holds at once during a step.
* ``saved_activation_bytes`` measures what autograd keeps for the backward pass (of a
  ``TransformerBlock``, say); ``activation_bytes_per_layer`` is the published formula for a
  transformer layer (Korthikanti et al. 2022).
* ``model_state_categories`` splits model states by kind under each ZeRO stage, ``gpt_parameters``
  counts a GPT's parameters by formula and ``count_parameters_on_meta`` by building it on the
  ``meta`` device (shapes without memory).

Measured numbers come from the tensors a rank holds; formulas are labelled as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import plotly.graph_objects as go
import torch

from . import plots
from .trace import Watching

__all__ = ["GiB", "MiB", "CATEGORIES", "COLOURS", "tensor_bytes", "MemoryReport", "memory_report",
           "memory_figure", "PeakMemory", "saved_activation_bytes", "TransformerBlock",
           "activation_bytes_per_layer", "count_parameters_on_meta", "model_state_categories",
           "gpt_parameters"]

GiB = 2**30
MiB = 2**20
CATEGORIES = ("parameters", "gradients", "optimizer state", "activations")
COLOURS = {"parameters": "#4C78A8", "gradients": "#F58518", "optimizer state": "#54A24B",
           "activations": "#B279A2"}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores: a DTensor's (FSDP2, tensor parallel) local shard."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _tensors(things) -> list[torch.Tensor]:
    """Every tensor in ``things``: a tensor, a module, an optimizer, or (nested) lists and dicts of them."""
    if things is None:
        return []
    if isinstance(things, torch.Tensor):
        return [things]
    if isinstance(things, torch.nn.Module):
        return list(things.parameters())
    if isinstance(things, torch.optim.Optimizer):
        return _tensors(list(things.state.values()))
    if isinstance(things, Mapping):
        things = things.values()
    if isinstance(things, (str, bytes)) or not isinstance(things, Iterable):
        return []  # numbers, strings, anything else that holds no tensor
    found = []
    for item in things:
        found += _tensors(item)
    return found


def tensor_bytes(things, *, exclude=(), _seen: set | None = None) -> int:
    """Bytes of memory held by the tensors in ``things`` (tensors, modules, optimizers, lists, dicts).

    Each block of memory counts once, however many tensors view it (a flat buffer and the
    parameters that are views into it); a sharded tensor counts only this rank's shard; tensors
    that share memory with ``exclude`` do not count. Tensors on the ``meta`` device count
    ``numel * element_size`` (they hold no memory but say how much they would).
    """
    seen = set() if _seen is None else _seen
    for tensor in _tensors(exclude):
        tensor = _local(tensor)
        if tensor.device.type != "meta":
            seen.add((tensor.device, tensor.untyped_storage().data_ptr()))
    total = 0
    for tensor in _tensors(things):
        tensor = _local(tensor)
        if tensor.device.type == "meta":
            total += tensor.numel() * tensor.element_size()
            continue
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


@dataclass
class MemoryReport:
    """Bytes one rank holds, per category (``CATEGORIES``)."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def as_dict(self) -> dict[str, int]:
        return dict(zip(CATEGORIES, (self.parameters, self.gradients, self.optimizer_state, self.activations)))

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {_human(v)}" for k, v in self.as_dict().items())
        return f"{_human(self.total)} ({parts})"


def _human(nbytes: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def memory_report(model: torch.nn.Module | None = None, optimizer=None, *, parameters=None, gradients=None,
                  optimizer_state=None, activations=0) -> MemoryReport:
    """What the calling rank holds, measured from its tensors.

    ``model`` gives the parameters and their ``.grad``; ``optimizer`` its state (momentum,
    Adam's moments). Pass ``parameters=``, ``gradients=`` or ``optimizer_state=`` (tensors or
    lists of tensors) to count something else instead, e.g. a hand-written optimizer's shard.
    ``activations`` is a number of bytes (see :func:`saved_activation_bytes`) or tensors.
    Memory counted in one category is not counted again in the next.
    """
    seen: set = set()
    params = parameters if parameters is not None else (list(model.parameters()) if model is not None else [])
    grads = gradients if gradients is not None else [p.grad for p in _tensors(params) if p.grad is not None]
    state = optimizer_state if optimizer_state is not None else optimizer
    report = MemoryReport(parameters=tensor_bytes(params, _seen=seen), gradients=tensor_bytes(grads, _seen=seen),
                          optimizer_state=tensor_bytes(state, _seen=seen))
    report.activations = activations if isinstance(activations, (int, float)) else tensor_bytes(activations, _seen=seen)
    return report


def memory_figure(reports: Mapping[str, Sequence[MemoryReport]], *, title: str = "Memory per device (measured)",
                  unit: str = "KiB", height: int = 420, peaks: Mapping[str, Sequence[float]] | None = None) -> go.Figure:
    """Stacked bars, one per rank, grouped by strategy: ``reports`` maps a strategy's name to
    the list of its ranks' :class:`MemoryReport`. ``peaks`` (same keys, bytes per rank, e.g. from
    :class:`PeakMemory`) adds a black mark per rank: the most memory held at once during the step."""
    scale = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": GiB}[unit]
    strategies = [name for name, ranks in reports.items() for _ in ranks]
    ranks = [f"rank {r}" for ranks_ in reports.values() for r in range(len(ranks_))]
    fig = go.Figure()
    for category in CATEGORIES:
        values = [getattr(rep, category.replace(" ", "_")) / scale for reps in reports.values() for rep in reps]
        fig.add_trace(go.Bar(x=[strategies, ranks], y=values, name=category, marker_color=COLOURS[category],
                             hovertemplate=f"%{{x}}<br>{category}: %{{y:.1f}} {unit}<extra></extra>"))
    if peaks:
        fig.add_trace(go.Scatter(
            x=[[name for name, ranks_ in peaks.items() for _ in ranks_],
               [f"rank {r}" for ranks_ in peaks.values() for r in range(len(ranks_))]],
            y=[v / scale for ranks_ in peaks.values() for v in ranks_], mode="markers", name="peak during the step",
            marker=dict(symbol="line-ew-open", size=28, color="black", line=dict(width=3)),
            hovertemplate=f"%{{x}}<br>peak: %{{y:.1f}} {unit}<extra></extra>"))
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title=unit)
    return plots.style(fig, title, height)


def saved_activation_bytes(fn: Callable, *args, exclude=(), **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and measure the bytes autograd saves for the backward pass.

    Returns ``(result, bytes)``. Tensors that share memory with ``exclude`` (pass the model:
    its weights are saved too, but they are parameters, not activations) do not count; each
    block of memory counts once.
    """
    seen = set()
    for tensor in _tensors(exclude):
        seen.add(_local(tensor).untyped_storage().data_ptr())
    total = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and tensor.device.type != "meta":
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    return result, total[0]


class TransformerBlock(torch.nn.Module):
    """A pre-norm GPT block (causal self-attention, then a 4x MLP), small enough to measure.

    ``fused=False`` computes attention the textbook way, keeping the ``T x T`` scores for the
    backward pass; ``fused=True`` calls ``F.scaled_dot_product_attention``, whose kernel keeps only
    a row statistic (the FlashAttention idea of Phase 1).
    """

    def __init__(self, d_model: int = 64, n_heads: int = 4, *, fused: bool = False):
        super().__init__()
        self.n_heads, self.fused = n_heads, fused
        self.ln1 = torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.ln2 = torch.nn.LayerNorm(d_model)
        self.fc1 = torch.nn.Linear(d_model, 4 * d_model)
        self.fc2 = torch.nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.n_heads)
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            heads = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        x = x + self.proj(heads.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def activation_bytes_per_layer(seq_len: int, micro_batch: int, hidden: int, heads: int, *, tensor_parallel: int = 1,
                               sequence_parallel: bool = False, recompute: str = "none") -> float:
    """Activation memory of one transformer layer in bytes, 16-bit activations
    (Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer Models*, Table 2).

    ``s b h (34 + 5 a s / h)`` without parallelism; tensor parallelism of degree ``t`` divides the
    parts inside the attention and MLP blocks (``10 + 24/t``), sequence parallelism the rest;
    ``recompute="selective"`` drops the attention-score terms (``5 a s / h``); ``"full"`` keeps
    only the layer's input (``2 s b h``, divided by ``t`` with sequence parallelism).
    """
    s, b, h, a, t = seq_len, micro_batch, hidden, heads, tensor_parallel
    if recompute == "full":
        return 2 * s * b * h / (t if sequence_parallel else 1)
    attention_scores = 0 if recompute == "selective" else 5 * a * s / h
    if sequence_parallel:
        return s * b * h * (34 + attention_scores) / t
    return s * b * h * (10 + 24 / t + attention_scores / t)


def count_parameters_on_meta(build: Callable[[], torch.nn.Module]) -> int:
    """Number of parameters of the model ``build()`` makes, built on the ``meta`` device: shapes
    without memory, so a 70-billion-parameter model costs nothing."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def model_state_categories(n_params: float, world_size: int, zero_stage: int, *,
                           bytes_per_param: Sequence[float] = (2, 2, 12)) -> dict[str, float]:
    """Bytes of each kind of model state one device holds with ZeRO stage ``zero_stage`` on
    ``world_size`` data-parallel devices: ``{"parameters", "gradients", "optimizer state"}``.
    ``bytes_per_param`` defaults to mixed-precision Adam (2 + 2 + 12, Rajbhandari et al. 2020);
    stage 1 shards the optimizer state, stage 2 the gradients too, stage 3 the parameters too."""
    sharded_from = {"parameters": 3, "gradients": 2, "optimizer state": 1}
    return {name: size * n_params / (world_size if zero_stage >= sharded_from[name] else 1)
            for name, size in zip(sharded_from, bytes_per_param)}


class PeakMemory(Watching):
    """Measure the most memory a rank holds at once inside ``with PeakMemory(model, optimizer) as peak:``.

    Every tensor an operator creates in the block counts from its creation until its memory is freed
    (a block of memory counts once, however many tensors view it); the tensors of the objects passed
    in (modules, optimizers, tensors, lists of them) count from the start. ``peak.peak`` is the
    largest total seen, ``peak.start`` and ``peak.end`` the totals at both ends. It sees what
    autograd saves for the backward pass, temporary buffers of collectives and optimizer state, at
    the moment they exist -- unlike a report taken after the step. CPU and GPU alike; a measurement.
    """

    def __init__(self, *held):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef
        self._weak = StorageWeakRef
        self._live: dict[int, tuple] = {}
        self.current = self.peak = 0
        for tensor in _tensors(list(held)):
            self._track(_local(tensor))
        self.start = self.peak = self.current
        self.end = 0

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        # A freed block's address can be reused: forget the dead before looking the new one up.
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        key = storage._cdata
        if key not in self._live:
            self._live[key] = (self._weak(storage), nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def __exit__(self, *exc):
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        self.end = self.current
        return super().__exit__(*exc)


def gpt_parameters(n_layers: int, hidden: int, vocab: int = 50257, seq_len: int = 2048) -> int:
    """Parameters of a GPT-style decoder: ``12 L h^2`` in the layers (attention ``4h^2``, MLP
    ``8h^2``) plus biases and norms, the token and position embeddings (Narayanan et al. 2021, eq. 2)."""
    return 12 * n_layers * hidden**2 + 13 * n_layers * hidden + (vocab + seq_len) * hidden
