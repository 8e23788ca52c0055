"""Phase 7: communication -- what a rank sends, what it would cost, what it costs here.

* ``CommLog`` records the bytes and group size of every collective a rank calls (its own and
  those of DDP, FSDP, DTensor);
* ``collective_time`` turns them into seconds with the alpha-beta model of ring algorithms and
  the ``INTERCONNECTS`` below (labelled assumptions, not measurements);
* ``time_collective`` measures collectives on the ranks of this machine and ``fit_alpha_beta``
  fits the model's alpha and beta to those measurements;
* figures: ``comm_time_figure`` (modelled time per strategy and link), ``overlap_figure`` (a
  measured timeline of a backward pass and the all-reduces launched during it) and
  ``ring_allreduce_figure`` (who sends which chunk at each step of a ring all-reduce).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import plotly.graph_objects as go
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from . import plots
from .distributed import all_gather_single, reduce_scatter_single

__all__ = ["CommEvent", "CommLog", "Interconnect", "INTERCONNECTS", "collective_time", "modelled_time",
           "time_collective", "fit_alpha_beta", "comm_time_figure", "overlap_figure", "ring_allreduce_figure"]

BACKWARD_COLOUR = "#F58518"


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
                             y=[f"{name}: backward"] * len(spans), orientation="h", marker_color=BACKWARD_COLOUR,
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
