"""Phase 7: pipeline schedules -- simulate them, draw them, run them on real ranks.

A schedule is, for each stage, the ordered list of the steps it runs: ``("F", m)`` (forward of
microbatch ``m``), ``("B", m)`` (its backward) and, when the backward is split in two as
zero-bubble schedules do, ``("W", m)`` (the weight-gradient half; ``B`` is then the input-gradient
half). With several model chunks per device (interleaved 1F1B) a step is ``(kind, m, chunk)``.

* ``gpipe_schedule``, ``interleaved_1f1b_schedule``, ``zero_bubble_h1_schedule`` -- published
  schedules (1F1B is the notebook's exercise 7 and ZB-H1 its exercise 8: their tests switch the
  references here off);
* ``simulate_pipeline`` plays any schedule on simulated devices (a model of time, not a
  measurement) and ``pipeline_gantt`` draws it, with the bubble; ``bubble_formula`` is the
  published idle share of GPipe, 1F1B and interleaved 1F1B;
* ``run_pipeline`` executes a schedule of F and B steps on real ranks with ``isend``/``irecv``;
  ``measured_run`` turns its measured steps into a chart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import plotly.graph_objects as go
import torch
import torch.distributed as dist

from . import plots

__all__ = ["STEP_COLOURS", "Schedule", "ScheduleError", "gpipe_schedule", "interleaved_1f1b_schedule",
           "zero_bubble_h1_schedule", "PipelineRun", "simulate_pipeline", "bubble_formula", "pipeline_gantt",
           "run_pipeline", "measured_run"]

STEP_COLOURS = {"F": "#4C78A8", "B": "#F58518", "W": "#54A24B"}

Schedule = list  # a stage's ordered list of ("F", microbatch), ("B", microbatch) (and ("W", microbatch))


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


def zero_bubble_h1_schedule(stage: int, n_stages: int, n_microbatches: int) -> Schedule:
    """ZB-H1 (Qi, Wan, Huang & Lin 2024, *Zero Bubble (Almost) Pipeline Parallelism*, ICLR, section
    2.1): the backward pass split into ``("B", m)``, the gradient with respect to the stage's input
    (what the previous stage waits for), and ``("W", m)``, the gradient with respect to its weights
    (which nobody waits for). Stage ``s`` follows 1F1B's order of F and B (``p - s - 1`` warm-up
    forwards, then one forward, one backward) and runs its W steps ``s`` microbatches late: after
    the B of microbatch ``i`` comes the W of microbatch ``i - s``, and the last ``s`` W run at the
    end, where they fill what would be the cool-down's bubble. Every stage then holds at most ``p`` microbatches' activations (a
    microbatch's activations are freed by its W), 1F1B's peak on the first stage. With ``m >= p``
    and free communication a stage idles ``(p - 1)(T_F + T_B - T_W)``, against 1F1B's
    ``(p - 1)(T_F + T_B + T_W)``."""
    p, m = n_stages, n_microbatches
    warmup = min(p - stage - 1, m)
    delayed = stage
    steps = [("F", i) for i in range(warmup)]
    weights_done = 0
    for i in range(m):
        if warmup + i < m:
            steps.append(("F", warmup + i))
        steps.append(("B", i))
        if i >= delayed:
            steps.append(("W", weights_done))
            weights_done += 1
    return steps + [("W", i) for i in range(weights_done, m)]


@dataclass
class PipelineRun:
    """A simulated schedule: ``events`` as ``(stage, kind, microbatch, start, end)`` (with chunks, the
    microbatch is written ``"m:c"``), the ``makespan``, the ``bubble`` fraction (idle share of
    stage-time) and, per stage, the most microbatches (chunk-microbatches with ``chunks``) whose
    activations were held at once (``peak_in_flight``; they are freed by the backward, or by the W
    step when the backward is split)."""

    events: list
    makespan: float
    bubble: float
    peak_in_flight: list
    n_stages: int
    n_microbatches: int
    n_chunks: int = 1


def _check_schedule(schedule, stage: int, n_microbatches: int, chunks: int = 1) -> list:
    steps = [(str(step[0]).upper(), int(step[1]), int(step[2]) if len(step) > 2 else 0) for step in schedule]
    kinds = ("F", "B", "W") if any(kind == "W" for kind, _, _ in steps) else ("F", "B")
    expected = sorted((kind, m, c) for c in range(chunks) for m in range(n_microbatches) for kind in kinds)
    if sorted(steps) != expected:
        name = (lambda st: st[:2]) if chunks == 1 else (lambda st: st)
        missing = [name(st) for st in sorted(set(expected) - set(steps))]
        extra = [name(st) for st in steps if steps.count(st) > 1 or st not in expected]
        raise ScheduleError(f"stage {stage} must do {' and '.join(kinds)} of each of the {n_microbatches} microbatches "
                            f"exactly once{'' if chunks == 1 else f' for each of its {chunks} chunks'}; "
                            f"missing {missing[:4]}, repeated or unknown {sorted(set(extra))[:4]}")
    done = set()
    for kind, m, c in steps:
        before = {"B": "F", "W": "B"}.get(kind)
        if before and (before, m, c) not in done:
            raise ScheduleError(f"stage {stage} runs {kind}{m} before {before}{m}: "
                                + ("a backward needs its forward's activations" if kind == "B" else
                                   "the weight gradient needs the output gradient that B receives"))
        done.add((kind, m, c))
    return steps


def simulate_pipeline(schedule_fn: Callable[[int, int, int], Schedule], n_stages: int, n_microbatches: int, *,
                      t_forward: float = 1.0, t_backward: float = 2.0, t_weight: float | None = None,
                      t_comm: float = 0.0, chunks: int = 1) -> PipelineRun:
    """Play ``schedule_fn(stage, n_stages, n_microbatches)`` on ``n_stages`` simulated devices.

    Each stage runs its steps in its order, one at a time. F of microbatch m on stage s waits for
    F m on stage s-1 (plus ``t_comm``); B m on stage s waits for B m on stage s+1. Times are in
    units of your choice (a modelled time, not a measurement). ``t_backward`` is the whole
    backward pass; a stage whose schedule splits it into B and W steps (zero-bubble schedules)
    spends ``t_weight`` (default: half of ``t_backward``) on W and the rest on B, and W waits for
    nothing but its own B. With ``chunks = v > 1`` each device holds v model chunks (steps ``(kind,
    m, chunk)``, see :func:`interleaved_1f1b_schedule`): chunk c of device s is virtual stage
    ``c p + s``, and a step takes ``1/v`` of the time. Raises :class:`ScheduleError` for a
    schedule that cannot run.
    """
    p, m, v = n_stages, n_microbatches, chunks
    lists = [_check_schedule(schedule_fn(s, p, m), s, m, v) for s in range(p)]
    t_weight = t_backward / 2 if t_weight is None else t_weight
    if not 0 <= t_weight <= t_backward:
        raise ValueError(f"t_weight ({t_weight}) must lie between 0 and t_backward ({t_backward})")
    split = [any(kind == "W" for kind, _, _ in steps) for steps in lists]
    finished: dict[tuple, float] = {}
    position = [0] * p
    free_at = [0.0] * p
    events = []
    while any(position[s] < len(lists[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            duration = {"F": t_forward / v, "B": (t_backward - (t_weight if split[s] else 0.0)) / v,
                        "W": t_weight / v}
            while position[s] < len(lists[s]):
                kind, mb, c = lists[s][position[s]]
                virtual = c * p + s + (-1 if kind == "F" else 1)
                dependency = (virtual % p, kind, mb, virtual // p)
                if kind == "W" or not 0 <= virtual < p * v:
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
            held += {"F": 1, "B": 0 if split[s] else -1, "W": -1}[kind]
            peak = max(peak, held)
        peaks.append(peak)
    return PipelineRun(events, makespan, 1 - busy / (p * makespan), peaks, p, m, v)


def bubble_formula(n_stages: int, n_microbatches: int, chunks: int = 1) -> float:
    """The idle share of a GPipe or 1F1B pipeline with equal stages and free communication:
    ``(p - 1) / (m + p - 1)`` (Huang et al. 2019; Narayanan et al. 2021). With ``chunks = v``
    (interleaved 1F1B) the bubble's time is divided by v: ``(p - 1) / (v m + p - 1)``. (Measured
    against the ideal compute time instead of the whole step, the same bubble is ``(p - 1) / (v m)``.)"""
    return (n_stages - 1) / (chunks * n_microbatches + n_stages - 1)


def pipeline_gantt(run: PipelineRun, *, title: str | None = None, time_unit: str = "forward steps",
                   height: int | None = None) -> go.Figure:
    """A Gantt chart of a :class:`PipelineRun` (or a measured run): a row per stage, blue
    forwards, orange backwards (input gradients, when the backward is split), green weight
    gradients, the microbatch written in each box, white gaps = the bubble."""
    fig = go.Figure()
    split = any(e[1] == "W" for e in run.events)
    for kind, label in (("F", "forward"), ("B", "backward, input gradient" if split else "backward"),
                        ("W", "backward, weight gradient")):
        chosen = [e for e in run.events if e[1] == kind]
        if not chosen:
            continue
        fig.add_trace(go.Bar(
            base=[e[3] for e in chosen], x=[e[4] - e[3] for e in chosen], y=[f"stage {e[0]}" for e in chosen],
            orientation="h", name=label, marker=dict(color=STEP_COLOURS[kind], line=dict(color="white", width=1)),
            text=[str(e[2]) for e in chosen], textposition="inside", insidetextanchor="middle",
            hovertemplate="%{y}: " + label + " of microbatch %{text}<br>%{base:.3g} → %{customdata:.3g}<extra></extra>",
            customdata=[e[4] for e in chosen]))
    fig.update_yaxes(autorange="reversed", categoryorder="array",
                     categoryarray=[f"stage {s}" for s in range(run.n_stages)])
    fig.update_xaxes(title=f"time ({time_unit})", range=[0, run.makespan * 1.01])
    fig.update_layout(barmode="overlay", bargap=0.25, legend=dict(orientation="h", y=-0.25))
    p, m, v = run.n_stages, run.n_microbatches, run.n_chunks
    if split:
        formula = f"GPipe and 1F1B: (p-1)/(m+p-1) = {bubble_formula(p, m):.3f}"
    elif v == 1:
        formula = f"formula (p-1)/(m+p-1) = {bubble_formula(p, m):.3f}"
    else:
        formula = f"{v} chunks per device, formula (p-1)/(vm+p-1) = {bubble_formula(p, m, v):.3f}"
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
