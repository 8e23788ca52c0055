"""Phase 7 helpers: what a laptop CPU cannot show about parallel training.

The ranks of Phase 7 are real processes talking through ``torch.distributed`` (see
``utils.distributed``). This module adds what a CPU cannot show by itself, and says which
numbers are *measured* and which are *modelled*:

* **memory per device** -- ``memory_report`` counts the bytes one rank really holds (parameters,
  gradients, optimizer state, activations; only its own shard of a sharded tensor), and
  ``memory_figure`` draws the reports of all ranks side by side. ``saved_activation_bytes``
  measures what autograd keeps for the backward pass (of a ``TransformerBlock``, say);
  ``activation_bytes_per_layer`` is the published formula for a transformer layer;
  ``count_parameters_on_meta`` counts the parameters of a model far bigger than the machine.
* **time** -- ``CommLog`` records the bytes and group size of every collective a rank calls;
  ``collective_time`` turns them into seconds with the alpha-beta model and the
  ``INTERCONNECTS`` below (labelled assumptions, not measurements).
* **pictures** -- ``ring_allreduce_figure`` (who sends which chunk at each step),
  ``simulate_pipeline`` + ``pipeline_gantt`` (pipeline schedules as Gantt charts, with the
  bubble), and ``planner`` (a 3D-parallelism planner with sliders).
* **a pipeline runner** -- ``run_pipeline`` executes any schedule of forward and backward
  microbatch steps on real ranks with ``isend``/``irecv``.

Nothing here solves a graded exercise: the planner takes your exercise-1 memory function as an
argument, and the pipeline tools take your exercise-6 schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import plotly.graph_objects as go
import torch
import torch.distributed as dist
from plotly.subplots import make_subplots
from torch.utils._python_dispatch import TorchDispatchMode

from . import plots
from .distributed import all_gather_single, reduce_scatter_single

GiB = 2**30
MiB = 2**20
CATEGORIES = ("parameters", "gradients", "optimizer state", "activations")
COLOURS = {"parameters": "#4C78A8", "gradients": "#F58518", "optimizer state": "#54A24B",
           "activations": "#B279A2", "F": "#4C78A8", "B": "#F58518"}


# ---------------------------------------------------------------------------------------------
# Memory: what one rank holds
# ---------------------------------------------------------------------------------------------

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


class PeakMemory(TorchDispatchMode):
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


# ---------------------------------------------------------------------------------------------
# Communication: a log of collectives, and the alpha-beta cost model
# ---------------------------------------------------------------------------------------------

@dataclass
class CommEvent:
    """One communication call: ``op`` (``all_reduce``, ``reduce_scatter``, ``all_gather``,
    ``broadcast``, ``send``, ``recv``, ``barrier``...), ``nbytes`` (the size of the whole buffer
    the collective works on -- for a reduce-scatter the unsharded input, for an all-gather the
    gathered output, for send/recv the message), ``group_size`` and ``at``, the moment of the call
    (``time.perf_counter()`` seconds: when it was launched, not when it finished)."""

    op: str
    nbytes: int
    group_size: int
    at: float = 0.0


_OP_NAMES = {"allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
             "all_reduce_": "all_reduce", "_reduce_scatter_base_": "reduce_scatter",
             "reduce_scatter_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
             "reduce_scatter_tensor_coalesced": "reduce_scatter", "_allgather_base_": "all_gather",
             "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
             "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
             "broadcast_": "broadcast", "broadcast": "broadcast", "send": "send", "recv_": "recv",
             "recv_any_source_": "recv", "barrier": "barrier", "alltoall_": "all_to_all",
             "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all", "reduce_": "reduce",
             "gather_": "gather", "scatter_": "scatter"}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _group_size(args) -> int | None:
    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(arg).size()
            except Exception:  # noqa: BLE001 - a ReduceOp, not a group
                continue
    return None


class CommLog(TorchDispatchMode):
    """Inside ``with CommLog() as log:``, every ``torch.distributed`` call the rank makes is
    recorded in ``log.events`` (see :class:`CommEvent`). It sees the calls of your code and of
    PyTorch's own parallel modules (DDP, FSDP, DTensor), because they all reach the same
    ``c10d`` operators.

    >>> with CommLog() as log:
    ...     dist.all_reduce(x)
    >>> log.summary()   # {'all_reduce': {'calls': 1, 'bytes': 4096}}
    """

    def __init__(self):
        super().__init__()
        self.events: list[CommEvent] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = getattr(func, "namespace", "")
        name = func.overloadpacket.__name__
        if namespace in ("c10d", "_c10d_functional") and name in _OP_NAMES:
            op = _OP_NAMES[name]
            group = _group_size(args) or (dist.get_world_size() if dist.is_initialized() else 1)
            if namespace == "_c10d_functional":
                group = next((a for a in args[1:] if isinstance(a, int) and a > 0), group)
            self.events.append(CommEvent(op, self._size(op, name, args, group), group, time.perf_counter()))
        return func(*args, **kwargs)

    @staticmethod
    def _size(op: str, name: str, args, group: int) -> int:
        if op == "all_gather":
            if name in ("_allgather_base_",):
                return _nbytes(args[0])  # the gathered output
            if name == "allgather_":
                return _nbytes(args[1]) * group
            return _nbytes(args[0]) * group  # functional: the local input
        if op == "reduce_scatter":
            if name == "_reduce_scatter_base_":
                return _nbytes(args[1])  # the unsharded input
            if name == "reduce_scatter_":
                return _nbytes(args[1])
            return _nbytes(args[0])  # functional: the input
        if op == "barrier":
            return 0
        return _nbytes(args[0])

    def summary(self) -> dict[str, dict[str, int]]:
        """``{op: {"calls": n, "bytes": total}}`` over the recorded events."""
        out: dict[str, dict[str, int]] = {}
        for event in self.events:
            entry = out.setdefault(event.op, {"calls": 0, "bytes": 0})
            entry["calls"] += 1
            entry["bytes"] += event.nbytes
        return out

    def bytes_sent(self) -> int:
        """Bytes this rank puts on the wire under the ring algorithms (what the cost model charges):
        ``2 (N-1)/N n`` for an all-reduce, ``(N-1)/N n`` for a reduce-scatter or all-gather,
        ``n`` for a send."""
        return int(sum(_wire_bytes(e.op, e.nbytes, e.group_size) for e in self.events))


@dataclass(frozen=True)
class Interconnect:
    """A link between GPUs for the alpha-beta model: ``alpha`` seconds of latency per message,
    ``bandwidth`` bytes per second per GPU and direction. ``source`` says where the numbers
    come from: they are assumptions for a model, not measurements."""

    name: str
    alpha: float
    bandwidth: float
    source: str


INTERCONNECTS = {
    "NVLink 4 (H100 SXM, inside a node)": Interconnect(
        "NVLink 4", 3e-6, 450e9,
        "NVIDIA H100 datasheet: 900 GB/s of NVLink bandwidth per GPU, 450 GB/s each way; alpha assumed"),
    "PCIe 4.0 x16": Interconnect(
        "PCIe 4.0 x16", 10e-6, 25e9,
        "32 GB/s theoretical per direction, about 25 GB/s achievable; alpha assumed"),
    "InfiniBand NDR 400 Gb/s (between nodes)": Interconnect(
        "InfiniBand NDR", 5e-6, 50e9, "400 Gb/s = 50 GB/s per GPU and direction (one NIC per GPU); alpha assumed"),
    "Ethernet 100 Gb/s (one NIC per GPU)": Interconnect(
        "100 GbE", 20e-6, 12.5e9, "100 Gb/s = 12.5 GB/s per GPU and direction (a NIC per GPU); alpha assumed"),
}


def _wire_bytes(op: str, nbytes: int, group: int) -> float:
    if group <= 1 and op not in ("send", "recv"):
        return 0.0
    factor = {"all_reduce": 2 * (group - 1) / group, "reduce_scatter": (group - 1) / group,
              "all_gather": (group - 1) / group, "all_to_all": (group - 1) / group,
              "broadcast": 1.0, "reduce": 1.0, "gather": (group - 1) / group, "scatter": (group - 1) / group,
              "send": 1.0, "recv": 0.0, "barrier": 0.0}.get(op, 1.0)
    return factor * nbytes


def collective_time(op: str, nbytes: float, group_size: int, link: Interconnect) -> float:
    """Modelled seconds of one collective on ``group_size`` GPUs joined by ``link`` (ring algorithms,
    alpha-beta model, Thakur, Rabenseifner & Gropp 2005):

    * all-reduce: ``2 (N-1) alpha + 2 (N-1)/N * n / beta``
    * reduce-scatter, all-gather, all-to-all: ``(N-1) alpha + (N-1)/N * n / beta``
    * broadcast: ``ceil(log2 N) (alpha + n / beta)`` (a binomial tree)
    * send: ``alpha + n / beta`` (a recv costs nothing more: its send paid)
    * barrier: ``ceil(log2 N) alpha``

    ``n`` is the size of the whole buffer (:class:`CommEvent`). A modelled time, not a measurement.
    """
    n, big_n = float(nbytes), int(group_size)
    if op == "recv":
        return 0.0
    if op == "send":
        return link.alpha + n / link.bandwidth
    if big_n <= 1:
        return 0.0
    steps = math.ceil(math.log2(big_n))
    if op == "all_reduce":
        return 2 * (big_n - 1) * link.alpha + 2 * (big_n - 1) / big_n * n / link.bandwidth
    if op in ("reduce_scatter", "all_gather", "all_to_all", "gather", "scatter"):
        return (big_n - 1) * link.alpha + (big_n - 1) / big_n * n / link.bandwidth
    if op in ("broadcast", "reduce"):
        return steps * (link.alpha + n / link.bandwidth)
    if op == "barrier":
        return steps * link.alpha
    raise ValueError(f"no cost model for {op!r}")


def modelled_time(events: Iterable[CommEvent], link: Interconnect) -> float:
    """Modelled seconds of all ``events`` one after the other on ``link`` (no overlap)."""
    return sum(collective_time(e.op, e.nbytes, e.group_size, link) for e in events)


def time_collective(op: str, sizes: Sequence[int], *, repeats: int = 5, dtype: torch.dtype = torch.float32) -> list[float]:
    """Run by every rank: the **measured** seconds of one ``op`` (``"all_reduce"``, ``"all_gather"``,
    ``"reduce_scatter"``) on a message of each size in bytes (the whole buffer, as in
    :class:`CommEvent`), the median of ``repeats`` runs after one warm-up, each run started
    together on every rank (a barrier) and ended by the slowest rank."""
    world = dist.get_world_size()
    element = torch.empty((), dtype=dtype).element_size()
    times = []
    for nbytes in sizes:
        n = max(world, int(nbytes) // element // world * world)
        full, shard = torch.ones(n, dtype=dtype), torch.ones(n // world, dtype=dtype)
        runs = []
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            if op == "all_reduce":
                dist.all_reduce(full)
            elif op == "all_gather":
                all_gather_single(full, shard)
            elif op == "reduce_scatter":
                reduce_scatter_single(shard, full)
            else:
                raise ValueError(f"cannot time {op!r}")
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)   # the collective ends when the slowest rank is done
            if i:
                runs.append(float(elapsed))
        times.append(sorted(runs)[len(runs) // 2])
    return times


def fit_alpha_beta(op: str, sizes: Sequence[float], seconds: Sequence[float], group_size: int) -> Interconnect:
    """Least-squares fit of the alpha-beta model of :func:`collective_time` to measured times:
    ``T = c_a alpha + c_b n / beta`` with the ring's counts (for an all-reduce ``c_a = 2 (N-1)``,
    ``c_b = 2 (N-1)/N``). Returns an :class:`Interconnect` with the fitted ``alpha`` and bandwidth."""
    big_n = group_size
    c_alpha, c_beta = {"all_reduce": (2 * (big_n - 1), 2 * (big_n - 1) / big_n)}.get(
        op, (big_n - 1, (big_n - 1) / big_n))
    design = torch.tensor([[c_alpha, c_beta * n] for n in sizes], dtype=torch.float64)
    target = torch.tensor(list(seconds), dtype=torch.float64)
    # Relative errors matter (times span decades): weight each row by 1 / its time.
    weights = 1 / target
    a, b = design * weights[:, None], target * weights
    alpha, inverse_bandwidth = (float(v) for v in torch.linalg.lstsq(a, b).solution)
    if alpha < 0 or inverse_bandwidth < 0:
        # Noisy times (a loaded machine) can make one term negative: keep it at zero, fit the other alone.
        column = 1 if alpha < 0 else 0
        value = float((a[:, column] @ b) / (a[:, column] @ a[:, column]))
        alpha, inverse_bandwidth = (0.0, value) if column == 1 else (value, 0.0)
    return Interconnect("fitted", alpha, 1 / inverse_bandwidth if inverse_bandwidth > 0 else math.inf,
                        f"fitted to {len(sizes)} measured {op} times on {group_size} ranks")


def comm_time_figure(logs: Mapping[str, Sequence[CommEvent]], *, links: Mapping[str, Interconnect] | None = None,
                     scale_bytes: float = 1.0, title: str | None = None) -> go.Figure:
    """Grouped bars: the modelled communication time of each strategy's events (one rank, one
    step) on each interconnect. ``scale_bytes`` multiplies every message size, to ask "what if the
    model were this many times bigger?"."""
    links = links or INTERCONNECTS
    fig = go.Figure()
    for name, link in links.items():
        times = [modelled_time([CommEvent(e.op, e.nbytes * scale_bytes, e.group_size) for e in events], link)
                 for events in logs.values()]
        fig.add_trace(go.Bar(x=list(logs), y=[t * 1e3 for t in times], name=name,
                             hovertemplate="%{x}: %{y:.3g} ms<extra>" + name + "</extra>"))
    fig.update_yaxes(title="modelled time per step (ms)", type="log")
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    return plots.style(fig, title or "Modelled communication time per step (alpha-beta model, assumptions above)",
                        420)


def overlap_figure(runs: Mapping[str, tuple], *, title: str | None = None) -> go.Figure:
    """A measured timeline of backward passes and the all-reduces launched during them, one row pair
    per run: ``runs`` maps a name to ``(spans, launches, backward_end, end)`` in milliseconds --
    ``spans`` the ``(layer, start, end)`` of each layer's backward, ``launches`` the moments
    all-reduces were launched, ``backward_end`` when ``loss.backward()`` returned and ``end`` when
    the gradients were averaged (the wait after the backward pass is the communication not hidden)."""
    fig = go.Figure()
    for name, (spans, launches, backward_end, end) in runs.items():
        fig.add_trace(go.Bar(base=[a for _, a, _ in spans], x=[b - a for _, a, b in spans],
                             y=[f"{name}: backward"] * len(spans), orientation="h", marker_color=COLOURS["B"],
                             text=[f"layer {i}" for i, _, _ in spans], textposition="inside", showlegend=False,
                             hovertemplate="%{text}: %{base:.2f} ms + %{x:.2f} ms<extra></extra>"))
        fig.add_trace(go.Bar(base=[backward_end], x=[max(end - backward_end, 0.0)], y=[f"{name}: waiting"],
                             orientation="h", marker_color="#E45756", showlegend=False,
                             hovertemplate="waiting for the all-reduces: %{x:.2f} ms<extra></extra>"))
        fig.add_trace(go.Scatter(x=list(launches), y=[f"{name}: backward"] * len(launches), mode="markers",
                                 marker=dict(symbol="triangle-down", size=12, color="black"), showlegend=False,
                                 hovertemplate="all-reduce launched at %{x:.2f} ms<extra></extra>"))
    fig.update_xaxes(title="time since the backward pass began (ms, measured on this CPU)")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(barmode="overlay", bargap=0.3)
    return plots.style(fig, title or "Backward pass (orange), all-reduces launched (triangles), waiting after it (red)",
                       140 + 60 * len(runs))


def ring_allreduce_figure(world_size: int = 4) -> go.Figure:
    """The ring all-reduce step by step, with a slider: a row per rank, a column per chunk; each
    cell says how many ranks' contributions the rank holds for that chunk (N = complete). During
    reduce-scatter rank r sends chunk (r - step) mod N to rank r + 1, which adds it to its own;
    during all-gather the completed chunks travel once more around the ring."""
    n = world_size
    held = [[1] * n for _ in range(n)]
    frames = [([row[:] for row in held], "start: every rank holds only its own contribution", [])]
    for step in range(n - 1):
        sends = [(r, (r - step) % n) for r in range(n)]
        new = [row[:] for row in held]
        for r, chunk in sends:
            new[(r + 1) % n][chunk] = held[(r + 1) % n][chunk] + held[r][chunk]
        held = new
        frames.append(([row[:] for row in held], f"reduce-scatter step {step + 1}: rank r sends chunk (r - {step}) mod N",
                       sends))
    for step in range(n - 1):
        sends = [(r, (r + 1 - step) % n) for r in range(n)]
        new = [row[:] for row in held]
        for r, chunk in sends:
            new[(r + 1) % n][chunk] = held[r][chunk]
        held = new
        frames.append(([row[:] for row in held], f"all-gather step {step + 1}: rank r sends chunk (r + 1 - {step}) mod N",
                       sends))

    def heat(matrix, sends):
        text = [[f"{v}/{n}" + (" →" if (r, c) in sends else "") for c, v in enumerate(row)]
                for r, row in enumerate(matrix)]
        return go.Heatmap(z=matrix, x=[f"chunk {c}" for c in range(n)], y=[f"rank {r}" for r in range(n)],
                          zmin=1, zmax=n, colorscale="Blues", text=text, texttemplate="%{text}",
                          hovertemplate="%{y}, %{x}: %{z} contributions<extra></extra>", showscale=False)

    fig = go.Figure(heat(*frames[0][::2]),
                    frames=[go.Frame(data=[heat(m, s)], name=str(i), layout=go.Layout(title_text=t))
                            for i, (m, t, s) in enumerate(frames)])
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        sliders=[dict(steps=[dict(method="animate", label=str(i),
                                  args=[[str(i)], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                             for i in range(len(frames))], currentvalue=dict(prefix="step "), pad=dict(t=40))])
    fig = plots.style(fig, frames[0][1], 380)
    fig.add_annotation(text="→ : the chunk this rank sends to rank r + 1 at this step", showarrow=False,
                       xref="paper", yref="paper", x=0, y=1.08)
    return fig


# ---------------------------------------------------------------------------------------------
# Pipeline schedules: simulate, draw, run
# ---------------------------------------------------------------------------------------------

Schedule = list  # a stage's ordered list of ("F", microbatch) and ("B", microbatch)


class ScheduleError(ValueError):
    """A schedule that cannot run: a step missing or repeated, a backward before its forward, or
    a deadlock (every stage waiting for another)."""


def gpipe_schedule(stage: int, n_stages: int, n_microbatches: int) -> Schedule:
    """GPipe (Huang et al. 2019): every forward, then every backward (in reverse order, as
    autograd would run one big batch). The same list on every stage."""
    return [("F", m) for m in range(n_microbatches)] + [("B", m) for m in reversed(range(n_microbatches))]


def interleaved_1f1b_schedule(stage: int, n_stages: int, n_microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2): device ``stage`` holds ``chunks`` model
    chunks, virtual stages ``stage, stage + p, stage + 2p, ...``; steps are ``(kind, microbatch,
    chunk)``. Microbatches go through in groups of ``p`` (chunk 0 for the group, then chunk 1, ...;
    backwards from the last chunk); ``2 (p - stage - 1) + (chunks - 1) p`` warm-up forwards, then one
    forward, one backward. Needs ``n_microbatches`` to be a multiple of ``n_stages``, as Megatron-LM
    does. Play it with ``simulate_pipeline(..., chunks=chunks)``."""
    p, m, v = n_stages, n_microbatches, chunks
    if m % p:
        raise ValueError(f"interleaved 1F1B needs the microbatches ({m}) to be a multiple of the stages ({p})")

    def step(kind: str, k: int) -> tuple:
        chunk = (k % (p * v)) // p
        return kind, (k // (p * v)) * p + k % p, chunk if kind == "F" else v - 1 - chunk

    total = m * v
    warmup = min((p - stage - 1) * 2 + (v - 1) * p if v > 1 else p - stage - 1, total)
    steps = [step("F", k) for k in range(warmup)]
    for i in range(total - warmup):
        steps += [step("F", warmup + i), step("B", i)]
    return steps + [step("B", k) for k in range(total - warmup, total)]


@dataclass
class PipelineRun:
    """A simulated schedule: ``events`` as ``(stage, kind, microbatch, start, end)`` (with chunks, the
    microbatch is written ``"m:c"``), the ``makespan``, the ``bubble`` fraction (idle share of
    stage-time) and, per stage, the most microbatches (chunk-microbatches with ``chunks``) whose
    activations were held at once (``peak_in_flight``)."""

    events: list
    makespan: float
    bubble: float
    peak_in_flight: list
    n_stages: int
    n_microbatches: int
    n_chunks: int = 1


def _check_schedule(schedule, stage: int, n_microbatches: int, chunks: int = 1) -> list:
    steps = [(str(step[0]).upper(), int(step[1]), int(step[2]) if len(step) > 2 else 0) for step in schedule]
    expected = sorted((kind, m, c) for c in range(chunks) for m in range(n_microbatches) for kind in ("F", "B"))
    if sorted(steps) != expected:
        name = (lambda st: st[:2]) if chunks == 1 else (lambda st: st)
        missing = [name(st) for st in sorted(set(expected) - set(steps))]
        extra = [name(st) for st in steps if steps.count(st) > 1 or st not in expected]
        raise ScheduleError(f"stage {stage} must do F and B of each of the {n_microbatches} microbatches exactly "
                            f"once{'' if chunks == 1 else f' for each of its {chunks} chunks'}; missing {missing[:4]}, "
                            f"repeated or unknown {sorted(set(extra))[:4]}")
    done = set()
    for kind, m, c in steps:
        if kind == "B" and ("F", m, c) not in done:
            raise ScheduleError(f"stage {stage} runs B{m} before F{m}: a backward needs its forward's activations")
        done.add((kind, m, c))
    return steps


def simulate_pipeline(schedule_fn: Callable[[int, int, int], Schedule], n_stages: int, n_microbatches: int, *,
                      t_forward: float = 1.0, t_backward: float = 2.0, t_comm: float = 0.0,
                      chunks: int = 1) -> PipelineRun:
    """Play ``schedule_fn(stage, n_stages, n_microbatches)`` on ``n_stages`` simulated devices.

    Each stage runs its steps in its order, one at a time. F of microbatch m on stage s waits for
    F m on stage s-1 (plus ``t_comm``); B m on stage s waits for B m on stage s+1. Times are in
    units of your choice (a modelled time, not a measurement). With ``chunks = v > 1`` each device
    holds v model chunks (steps ``(kind, m, chunk)``, see :func:`interleaved_1f1b_schedule`): chunk
    c of device s is virtual stage ``c p + s``, and a step takes ``1/v`` of the time. Raises
    :class:`ScheduleError` for a schedule that cannot run.
    """
    p, m, v = n_stages, n_microbatches, chunks
    lists = [_check_schedule(schedule_fn(s, p, m), s, m, v) for s in range(p)]
    duration = {"F": t_forward / v, "B": t_backward / v}
    finished: dict[tuple, float] = {}
    position = [0] * p
    free_at = [0.0] * p
    events = []
    while any(position[s] < len(lists[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while position[s] < len(lists[s]):
                kind, mb, c = lists[s][position[s]]
                virtual = c * p + s + (-1 if kind == "F" else 1)
                dependency = (virtual % p, kind, mb, virtual // p)
                if not 0 <= virtual < p * v:
                    ready = 0.0
                elif dependency in finished:
                    ready = finished[dependency] + t_comm
                else:
                    break
                start = max(free_at[s], ready)
                end = start + duration[kind]
                finished[(s, kind, mb, c)] = end
                free_at[s] = end
                events.append((s, kind, mb if v == 1 else f"{mb}:{c}", start, end))
                position[s] += 1
                progressed = True
        if not progressed:
            waits = [f"stage {s} waits to run {lists[s][position[s]][0]}{lists[s][position[s]][1]}"
                     + ("" if v == 1 else f" (chunk {lists[s][position[s]][2]})")
                     for s in range(p) if position[s] < len(lists[s])]
            raise ScheduleError("deadlock: every stage waits for another; " + "; ".join(waits))
    makespan = max(e[4] for e in events)
    busy = sum(e[4] - e[3] for e in events)
    peaks = []
    for s in range(p):
        held = peak = 0
        for kind, *_ in lists[s]:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return PipelineRun(events, makespan, 1 - busy / (p * makespan), peaks, p, m, v)


def bubble_formula(n_stages: int, n_microbatches: int, chunks: int = 1) -> float:
    """The idle share of a GPipe or 1F1B pipeline with equal stages and free communication:
    ``(p - 1) / (m + p - 1)`` (Huang et al. 2019; Narayanan et al. 2021). With ``chunks = v``
    (interleaved 1F1B) the bubble's time is divided by v: ``(p - 1) / (v m + p - 1)``."""
    return (n_stages - 1) / (chunks * n_microbatches + n_stages - 1)


def pipeline_gantt(run: PipelineRun, *, title: str | None = None, time_unit: str = "forward steps",
                   height: int | None = None) -> go.Figure:
    """A Gantt chart of a :class:`PipelineRun` (or a measured run): a row per stage, blue
    forwards, orange backwards, the microbatch written in each box, white gaps = the bubble."""
    fig = go.Figure()
    for kind, label in (("F", "forward"), ("B", "backward")):
        chosen = [e for e in run.events if e[1] == kind]
        fig.add_trace(go.Bar(
            base=[e[3] for e in chosen], x=[e[4] - e[3] for e in chosen], y=[f"stage {e[0]}" for e in chosen],
            orientation="h", name=label, marker=dict(color=COLOURS[kind], line=dict(color="white", width=1)),
            text=[str(e[2]) for e in chosen], textposition="inside", insidetextanchor="middle",
            hovertemplate="%{y}: " + label + " of microbatch %{text}<br>%{base:.3g} → %{customdata:.3g}<extra></extra>",
            customdata=[e[4] for e in chosen]))
    fig.update_yaxes(autorange="reversed", categoryorder="array",
                     categoryarray=[f"stage {s}" for s in range(run.n_stages)])
    fig.update_xaxes(title=f"time ({time_unit})", range=[0, run.makespan * 1.01])
    fig.update_layout(barmode="overlay", bargap=0.25, legend=dict(orientation="h", y=-0.25))
    p, m, v = run.n_stages, run.n_microbatches, run.n_chunks
    formula = (f"formula (p-1)/(m+p-1) = {bubble_formula(p, m):.3f}" if v == 1 else
               f"{v} chunks per device, formula (p-1)/(vm+p-1) = {bubble_formula(p, m, v):.3f}")
    default = (f"p = {p} stages, m = {m} microbatches: bubble {run.bubble:.3f} ({formula}); "
               f"activations held at most: {run.peak_in_flight}")
    return plots.style(fig, title or default, height or 120 + 45 * run.n_stages)


def run_pipeline(stage_module: torch.nn.Module, schedule: Schedule, *, microbatches: Sequence[torch.Tensor] | None,
                 targets: Sequence[torch.Tensor] | None, loss_fn: Callable | None, activation_shape: Sequence[int],
                 dtype: torch.dtype = torch.float32) -> dict:
    """Run this rank's pipeline stage for real, following ``schedule`` (a list of ``("F", m)`` and
    ``("B", m)``). Rank r is stage r; activations go to rank r+1 and gradients come back with
    ``isend``/``irecv``.

    Stage 0 reads ``microbatches``; the last stage computes ``loss_fn(output, targets[m])``, divided
    by the number of microbatches so that the gradients equal those of the whole batch.
    ``activation_shape`` is the shape of what one stage sends the next for one microbatch.
    Parameter gradients accumulate in ``stage_module``'s ``.grad``. Returns the loss (last stage,
    else ``None``) and the measured ``(stage, kind, microbatch, start, end)`` of every step, in
    seconds from the start.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == world - 1
    n_micro = len({m for _, m in schedule})
    saved: dict[int, tuple] = {}
    pending = []
    total_loss = torch.zeros(())
    events = []
    dev = next(stage_module.parameters()).device
    start_time = time.perf_counter()
    for kind, m in schedule:
        began = time.perf_counter() - start_time
        if kind == "F":
            if first:
                inputs = microbatches[m]
            else:
                inputs = torch.empty(tuple(activation_shape), dtype=dtype, device=dev)
                dist.recv(inputs, src=rank - 1, tag=m)
                inputs.requires_grad_(True)
            output = stage_module(inputs)
            if last:
                loss = loss_fn(output, targets[m]) / n_micro
                total_loss = total_loss + loss.detach()
                saved[m] = (inputs, loss)
            else:
                pending.append(dist.isend(output.detach().contiguous(), dst=rank + 1, tag=m))
                saved[m] = (inputs, output)
        else:
            inputs, output = saved.pop(m)
            if last:
                output.backward()
            else:
                grad = torch.empty_like(output)
                dist.recv(grad, src=rank + 1, tag=n_micro + m)
                output.backward(grad)
            if not first:
                pending.append(dist.isend(inputs.grad.contiguous(), dst=rank - 1, tag=n_micro + m))
        events.append((rank, kind, m, began, time.perf_counter() - start_time))
    for work in pending:
        work.wait()
    return {"loss": total_loss if last else None, "events": events}


def measured_run(events_per_rank: Sequence[Sequence[tuple]], n_microbatches: int) -> PipelineRun:
    """A :class:`PipelineRun` from the events :func:`run_pipeline` measured on each rank (times in
    milliseconds), for :func:`pipeline_gantt`."""
    events = [(s, k, m, a * 1e3, b * 1e3) for evs in events_per_rank for (s, k, m, a, b) in evs]
    makespan = max(e[4] for e in events)
    busy = sum(e[4] - e[3] for e in events)
    p = len(events_per_rank)
    return PipelineRun(events, makespan, 1 - busy / (p * makespan), [0] * p, p, n_microbatches)


# ---------------------------------------------------------------------------------------------
# The 3D-parallelism planner
# ---------------------------------------------------------------------------------------------

# Shapes of published models (GPT-3 paper Table 2.1; Llama 2 for 70B), used by the planner.
MODEL_SHAPES = {
    "1.3B (GPT-3 XL)": dict(n_layers=24, hidden=2048, heads=16),
    "6.7B (GPT-3)": dict(n_layers=32, hidden=4096, heads=32),
    "13B (GPT-3)": dict(n_layers=40, hidden=5120, heads=40),
    "70B (Llama-2-like)": dict(n_layers=80, hidden=8192, heads=64),
    "175B (GPT-3)": dict(n_layers=96, hidden=12288, heads=96),
}


@dataclass
class GPU:
    """A GPU for the planner: memory, peak dense 16-bit FLOP/s, and the links inside and between nodes."""

    name: str = "H100 SXM 80 GB"
    memory_bytes: float = 80e9
    peak_flops: float = 989e12  # dense BF16, NVIDIA datasheet
    gpus_per_node: int = 8
    intra_node: Interconnect = field(default_factory=lambda: INTERCONNECTS["NVLink 4 (H100 SXM, inside a node)"])
    inter_node: Interconnect = field(default_factory=lambda: INTERCONNECTS["InfiniBand NDR 400 Gb/s (between nodes)"])


@dataclass
class Plan:
    """What the planner computes for one layout: bytes per device by category, modelled seconds
    per step by component, and remarks (what does not fit, what is wasted)."""

    memory: dict
    time: dict
    data_parallel: int
    n_microbatches: int
    bubble: float
    notes: list


def plan_3d(memory_fn: Callable[[int, int, int], float] | None, *, n_layers: int, hidden: int, heads: int,
            gpus: int, tensor_parallel: int, pipeline_parallel: int, zero_stage: int = 1, micro_batch: int = 1,
            global_batch: int = 512, seq_len: int = 2048, recompute: str = "selective", vocab: int = 50257,
            mfu: float = 0.5, gpu: GPU | None = None) -> Plan:
    """Memory per device and modelled step time of a GPT-style model trained with tensor (``t``),
    pipeline (``p``) and data parallelism (``d = gpus / (t p)``) -- a model with stated assumptions:

    * parameters on the busiest device, the first pipeline stage: its ``L / p`` layers divided over
      the ``t`` tensor-parallel ranks, plus the token and position embeddings divided over ``t``
      (the last stage holds a tied copy for the output layer; the middle stages hold none);
    * model states per category for mixed-precision Adam (2 + 2 + 12 bytes per parameter), each
      divided by ``d`` only if the ZeRO stage shards it (:func:`model_state_categories`);
      ``memory_fn(params_per_device, d, zero_stage)`` (your exercise 1) must agree with their sum,
      else a note says so;
    * activations: :func:`activation_bytes_per_layer` (with sequence parallelism when ``t > 1``)
      for the ``L / p`` layers of the first stage, times the ``min(p, m)`` microbatches a 1F1B
      pipeline holds there (Korthikanti et al. 2022); with full recomputation only each layer's
      input is kept (the one layer being recomputed is not counted);
    * compute: ``6 N tokens`` FLOPs per step (8 with full recomputation) at ``mfu`` of the peak;
      the bubble adds ``(p-1)/m`` of that compute time (bubble time over ideal compute; as a share
      of the whole step it is ``(p-1)/(m+p-1)``, ``Plan.bubble``);
    * communication, not overlapped with compute: tensor parallelism all-reduces the activations
      4 times per layer and microbatch (on NVLink when ``t`` fits in a node); pipeline stages send
      activations and gradients; data parallelism all-reduces the bf16 gradients once per step
      (ZeRO 0 and 1). ZeRO-2 and 3 cannot keep whole gradients (or parameters) between the ``m``
      microbatches of a step (gradient accumulation, or a pipeline): ZeRO-2 reduce-scatters each
      microbatch's gradients and all-gathers the parameters once, ZeRO-3 all-gathers the parameters
      twice (forward and backward) and reduce-scatters the gradients for every microbatch -- the
      reason DeepSpeed refuses ZeRO-2/3 with pipeline parallelism. Links from ``gpu``; alpha-beta
      model.
    """
    gpu = gpu or GPU()
    t, p = tensor_parallel, pipeline_parallel
    notes = []
    d = gpus // (t * p) if gpus % (t * p) == 0 else 0
    if d == 0:
        return Plan({}, {}, 0, 0, 0.0, [f"{gpus} GPUs cannot be split into TP {t} x PP {p} x DP: "
                                        "TP x PP must divide the number of GPUs."])
    params = gpt_parameters(n_layers, hidden, vocab, seq_len)
    embedding = (vocab + seq_len) * hidden
    if n_layers % p:
        notes.append(f"{n_layers} layers do not split evenly into {p} stages (rounded up).")
    if heads % t:
        notes.append(f"{heads} heads do not split evenly over TP = {t}.")
    layers_per_stage = math.ceil(n_layers / p)
    per_device = math.ceil((params - embedding) * layers_per_stage / n_layers / t + embedding / t)
    memory = model_state_categories(per_device, d, zero_stage)
    if memory_fn is not None:
        yours = float(memory_fn(per_device, d, zero_stage))
        if not math.isclose(yours, sum(memory.values()), rel_tol=1e-3):
            notes.append(f"your model_state_bytes gives {yours / 1e9:.1f} GB for these {per_device / 1e9:.2f} B "
                         f"parameters, the categories add up to {sum(memory.values()) / 1e9:.1f} GB: check exercise 1.")
    n_micro = max(1, global_batch // (micro_batch * d))
    if global_batch % (micro_batch * d):
        notes.append(f"global batch {global_batch} is not a multiple of micro-batch x DP = {micro_batch * d}.")
    in_flight = min(p, n_micro)
    memory["activations"] = activation_bytes_per_layer(
        seq_len, micro_batch, hidden, heads, tensor_parallel=t, sequence_parallel=t > 1,
        recompute=recompute) * layers_per_stage * in_flight
    total = sum(memory.values())
    if total > gpu.memory_bytes:
        notes.append(f"does NOT fit: {total / 1e9:.0f} GB per device > {gpu.memory_bytes / 1e9:.0f} GB.")
    tokens = global_batch * seq_len
    flops = (8 if recompute == "full" else 6) * params * tokens
    compute = flops / (gpus * gpu.peak_flops * mfu)
    bubble = bubble_formula(p, n_micro)
    tp_link = gpu.intra_node if t <= gpu.gpus_per_node else gpu.inter_node
    dp_link = gpu.intra_node if t * p * d <= gpu.gpus_per_node else gpu.inter_node
    pp_link = gpu.intra_node if t * p <= gpu.gpus_per_node else gpu.inter_node
    act_bytes = 2 * micro_batch * seq_len * hidden
    tp_time = 4 * layers_per_stage * n_micro * collective_time("all_reduce", act_bytes, t, tp_link) if t > 1 else 0.0
    grad_bytes = 2 * per_device
    all_reduce = collective_time("all_reduce", grad_bytes, d, dp_link)
    gather = collective_time("all_gather", grad_bytes, d, dp_link)
    scatter = collective_time("reduce_scatter", grad_bytes, d, dp_link)
    dp_time = {0: all_reduce, 1: all_reduce, 2: n_micro * scatter + gather,
               3: n_micro * (2 * gather + scatter)}[zero_stage] if d > 1 else 0.0
    if zero_stage >= 2 and d > 1 and n_micro > 1:
        notes.append(f"ZeRO-{zero_stage} communicates for each of the {n_micro} microbatches of a step "
                     f"({'a pipeline' if p > 1 else 'gradient accumulation'}): "
                     f"{dp_time / all_reduce:.1f}x the time of data parallelism's one all-reduce "
                     "(DeepSpeed refuses ZeRO-2/3 with pipeline parallelism for this reason).")
    pp_time = 2 * n_micro * collective_time("send", act_bytes / t, 2, pp_link) if p > 1 else 0.0
    times = {"compute": compute,
             "pipeline bubble": compute * (p - 1) / n_micro if p > 1 else 0.0,
             "tensor-parallel comm.": tp_time, "pipeline comm.": pp_time, "data-parallel comm.": dp_time}
    if t > gpu.gpus_per_node:
        notes.append(f"TP = {t} spans nodes: its all-reduces leave NVLink (slow).")
    return Plan(memory, times, d, n_micro, bubble, notes)


def _plan_figure(plan: Plan, gpu: GPU) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("memory per device (GB)", "modelled time per step (s)"),
                        horizontal_spacing=0.15)
    for category in CATEGORIES:
        fig.add_trace(go.Bar(x=["memory"], y=[plan.memory.get(category, 0) / 1e9], name=category,
                             marker_color=COLOURS[category], legendgroup="memory"), row=1, col=1)
    colours = ["#4C78A8", "#E45756", "#72B7B2", "#EECA3B", "#9D755D"]
    for name, colour in zip(("compute", "pipeline bubble", "tensor-parallel comm.", "pipeline comm.",
                             "data-parallel comm."), colours):
        fig.add_trace(go.Bar(x=["time"], y=[plan.time.get(name, 0)], name=name, marker_color=colour,
                             legendgroup="time"), row=1, col=2)
    fig.add_hline(y=gpu.memory_bytes / 1e9, line_dash="dash", line_color="red", row=1, col=1,
                  annotation_text=f"{gpu.name}", annotation_position="top left")
    fig.update_layout(barmode="stack", legend=dict(orientation="v", x=1.02))
    return plots.style(fig, None, 420)


def planner(memory_fn: Callable[[int, int, int], float], gpu: GPU | None = None):
    """An interactive 3D-parallelism planner: choose the model, the number of GPUs and the tensor,
    pipeline and ZeRO settings; see memory per device and the modelled time of one step.

    ``memory_fn(n_params, world_size, zero_stage)`` gives the bytes of model states per device
    (exercise 1). All times are modelled (see :func:`plan_3d` for the assumptions).
    """
    import ipywidgets as widgets

    gpu = gpu or GPU()
    style = {"description_width": "initial"}
    model = widgets.Dropdown(options=list(MODEL_SHAPES), value="13B (GPT-3)", description="model", style=style)
    gpus = widgets.SelectionSlider(options=[8, 16, 32, 64, 128, 256, 512, 1024], value=64, description="GPUs",
                                   style=style)
    tp = widgets.SelectionSlider(options=[1, 2, 4, 8, 16], value=4, description="tensor parallel", style=style)
    pp = widgets.SelectionSlider(options=[1, 2, 4, 8, 16], value=2, description="pipeline parallel", style=style)
    zero = widgets.IntSlider(value=1, min=0, max=3, description="ZeRO stage", style=style)
    micro = widgets.SelectionSlider(options=[1, 2, 4, 8], value=1, description="micro-batch", style=style)
    batch = widgets.SelectionSlider(options=[128, 256, 512, 1024, 2048], value=512,
                                    description="global batch (sequences)", style=style)
    seq = widgets.SelectionSlider(options=[1024, 2048, 4096, 8192], value=2048, description="sequence length",
                                  style=style)
    recompute = widgets.ToggleButtons(options=["none", "selective", "full"], value="selective",
                                      description="recompute", style=style)
    summary = widgets.HTML()
    figure = plots.LiveFigure(_plan_figure(Plan({}, {}, 1, 1, 0.0, []), gpu))

    def refresh(_=None):
        shape = MODEL_SHAPES[model.value]
        try:
            plan = plan_3d(memory_fn, **shape, gpus=gpus.value, tensor_parallel=tp.value,
                           pipeline_parallel=pp.value, zero_stage=zero.value, micro_batch=micro.value,
                           global_batch=batch.value, seq_len=seq.value, recompute=recompute.value, gpu=gpu)
        except NotImplementedError:
            summary.value = "<b>Finish exercise 1 (model_state_bytes) to use the planner.</b>"
            return
        fresh = _plan_figure(plan, gpu)
        with figure.batch() as fig:
            for trace, new in zip(fig.data, fresh.data):
                trace.y = new.y
        params = gpt_parameters(shape["n_layers"], shape["hidden"])
        lines = [f"{params / 1e9:.1f} B parameters; DP = {plan.data_parallel}, "
                 f"{plan.n_microbatches} microbatches per step, bubble {plan.bubble:.1%}; "
                 f"memory {sum(plan.memory.values()) / 1e9:.1f} GB per device; "
                 f"step {sum(plan.time.values()):.2f} s (modelled)."] + plan.notes
        summary.value = "<br>".join(lines)

    for control in (model, gpus, tp, pp, zero, micro, batch, seq, recompute):
        control.observe(refresh, names="value")
    refresh()
    controls = widgets.VBox([widgets.HBox([model, gpus]), widgets.HBox([tp, pp, zero]),
                             widgets.HBox([micro, batch, seq]), recompute])
    assumptions = widgets.HTML(
        f"<small>Modelled, not measured: {gpu.name}, {gpu.peak_flops / 1e12:.0f} TFLOP/s peak at 50% utilisation; "
        f"{gpu.gpus_per_node} GPUs per node on {gpu.intra_node.name}, nodes joined by {gpu.inter_node.name}; "
        "no overlap of communication and compute; memory of the first pipeline stage (its layers and the "
        "embeddings, divided over the tensor-parallel ranks).</small>")
    return widgets.VBox([controls, summary, figure.widget, assumptions])
