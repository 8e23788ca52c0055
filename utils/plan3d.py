"""Phase 7: a 3D-parallelism planner -- memory per GPU and a modelled step time for a GPT trained
with tensor, pipeline and data parallelism (and ZeRO), with sliders.

``plan_3d`` is the model (its docstring states every assumption), ``planner`` the widget,
``MODEL_SHAPES`` the published model shapes and ``GPU`` the hardware it assumes. The memory
formulas come from ``utils.memory_accounting``, the communication costs from
``utils.communication``, the bubble from ``utils.pipeline``. Everything here is modelled, not
measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import plots
from .communication import INTERCONNECTS, Interconnect, collective_time
from .memory_accounting import (CATEGORIES, COLOURS, activation_bytes_per_layer, gpt_parameters,
                                model_state_categories)
from .pipeline import bubble_formula

__all__ = ["MODEL_SHAPES", "GPU", "Plan", "plan_3d", "planner"]


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
