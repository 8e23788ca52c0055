"""Phase 8 helpers (quantization): number formats, reference quantizers, the course model quantized,
and the figures and explorers of ``quantization.ipynb``.

The reference quantizers here are the "previous chapter" of the graded exercises: the notebook's
demonstrations use them so that they work even when an exercise is unfinished, and the hidden tests
compare your functions with them (calling them yourself earns nothing: the tests switch them off).

* number formats: ``FORMATS``, ``round_to_format``, ``format_table``, ``rounding_figure``
* references: ``absmax_quantize``, ``zeropoint_quantize``, ``dequantize``, ``zeropoint_dequantize``,
  ``quantized_linear``, ``llm_int8_matmul``, ``nf4_code_book``, ``nf4_quantize``, ``nf4_dequantize``,
  ``ternary_weights``, ``bitlinear``
* the course model: ``evaluation_windows``, ``perplexity``, ``fake_quantize_model``, ``weight_memory``,
  ``quantization_explorer``
* error-aware rounding: ``layer_inputs``, ``gptq_quantize``, ``awq_keep_channels``
* NF4 and QLoRA: ``double_quantized_bits``, ``NF4Linear``, ``qlora_model`` (with Phase 5's ``utils.lora``)
* BitNet b1.58: ``BitLinear``, ``train_tiny_models``
* real int8 kernels and a library: ``int8_weight_only``, ``weight_int8pack_available``, ``int8_matmul_timings``,
  ``torchao_comparison`` (only when torchao is installed), ``cpu_description``
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from . import plots, runtime
from .trace import Watching

# ---------------------------------------------------------------------------
# Number formats
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    exponent_bits: int     # 0 for integers
    mantissa_bits: int     # stored fraction bits (integers: the value bits)
    dtype: torch.dtype | None


FORMATS = {
    "fp32": Format("fp32", 32, 8, 23, torch.float32),
    "bf16": Format("bf16", 16, 8, 7, torch.bfloat16),
    "fp16": Format("fp16", 16, 5, 10, torch.float16),
    "fp8 e5m2": Format("fp8 e5m2", 8, 5, 2, torch.float8_e5m2),
    "fp8 e4m3": Format("fp8 e4m3", 8, 4, 3, torch.float8_e4m3fn),
    "int8": Format("int8", 8, 0, 7, None),
    "int4": Format("int4", 4, 0, 3, None),
}


def round_to_format(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` (float32) rounded to format ``name`` and back to float32.

    Floating-point formats are converted by PyTorch (values beyond the range become inf, or
    NaN for e4m3, which has no inf); integers use one absmax scale for the whole tensor.
    """
    fmt = FORMATS[name]
    if fmt.dtype is not None:
        return x.to(fmt.dtype).to(torch.float32)
    q, scale = absmax_quantize(x, fmt.bits)
    return dequantize(q, scale)


def format_table() -> list[dict]:
    """One row per format: bits, largest finite value, smallest positive normal, relative step at 1."""
    rows = []
    for fmt in FORMATS.values():
        if fmt.dtype is None:
            top = 2 ** (fmt.bits - 1) - 1
            rows.append(dict(format=fmt.name, bits=fmt.bits, largest=f"{top} x scale",
                             smallest_normal="1 x scale", step_at_1=f"1/{top} of the range"))
            continue
        info = torch.finfo(fmt.dtype)
        rows.append(dict(format=fmt.name, bits=fmt.bits, largest=f"{float(info.max):.4g}",
                         smallest_normal=f"{float(info.smallest_normal):.3g}", step_at_1=f"{float(info.eps):.3g}"))
    return rows


def rounding_figure(names: Sequence[str] = ("bf16", "fp16", "fp8 e4m3", "fp8 e5m2"), low: float = -10,
                    high: float = 6, points: int = 400):
    """Relative rounding error of each format over magnitudes 2**low .. 2**high (log axes)."""
    x = torch.logspace(low, high, points, base=2.0)
    series = {}
    for name in names:
        rel = ((round_to_format(x, name) - x).abs() / x)
        rel = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("nan")))
        series[name] = [v if v == v and v > 0 else None for v in rel.tolist()]
    return plots.line_chart(x, series, title="Relative rounding error of each format (gaps: exact, or out of range)",
                            xaxis_title="magnitude of the value", yaxis_title="|round(x) - x| / x",
                            log_x=True, log_y=True, markers=False, height=380)


# ---------------------------------------------------------------------------
# Reference quantizers (the hidden tests compare the exercises with these)
# ---------------------------------------------------------------------------


def _groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` viewed as (..., n_groups, group_size) along its last dimension; per tensor: (1, numel)."""
    if group_size is None:
        return w.reshape(1, -1)
    if w.shape[-1] % group_size:
        raise ValueError(f"the last dimension ({w.shape[-1]}) is not a multiple of group_size={group_size}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def absmax_quantize(w: torch.Tensor, bits: int, group_size: int | None = None):
    """Symmetric (absmax) quantization: ``(q, scale)``, ``q`` int8 in [-(2**(bits-1) - 1), 2**(bits-1) - 1].

    ``group_size=None``: one scale (shape ``()``); otherwise one scale per group of ``group_size``
    consecutive entries of the last dimension, shape ``(*w.shape[:-1], w.shape[-1] // group_size)``
    (per channel: ``group_size = w.shape[-1]``). An all-zero group gets scale 1.
    """
    qmax = 2 ** (bits - 1) - 1
    g = _groups(w.float(), group_size)
    absmax = g.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.clamp(torch.round(g / scale), -qmax, qmax).to(torch.int8).reshape(w.shape)
    scale = scale.squeeze(-1)
    return q, (scale.reshape(()) if group_size is None else scale)


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-group tensor (..., n_groups) repeated over each group, to ``shape``."""
    if scale.dim() == 0:
        return scale
    return scale.repeat_interleave(shape[-1] // scale.shape[-1], dim=-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32, the scale of each group repeated over its entries."""
    return q.float() * _expand(scale, q.shape)


def zeropoint_quantize(w: torch.Tensor, bits: int, group_size: int | None = None):
    """Asymmetric quantization: ``(q, scale, zero)``, ``q`` uint8 in [0, 2**bits - 1].

    ``scale = (max - min) / (2**bits - 1)`` and ``zero = round(-min / scale)`` (an integer, kept in
    [0, 2**bits - 1]), per tensor or per group as in ``absmax_quantize``; min and max include 0 so
    that zero is exact. A constant group gets scale 1.
    """
    qmax = 2 ** bits - 1
    g = _groups(w.float(), group_size)
    lo = g.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(g / scale) + zero, 0, qmax).to(torch.uint8).reshape(w.shape)
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    if group_size is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    return q, scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` in float32, per group."""
    return (q.float() - _expand(zero.float(), q.shape)) * _expand(scale, q.shape)


def quantized_linear(x: torch.Tensor, q_w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 linear layer: each row of ``x`` (N, in) absmax-quantized to int8, an exact integer matmul
    with the int8 weight ``q_w`` (out, in), then rescaled by both scales: (N, out) float32."""
    q_x, x_scale = absmax_quantize(x, 8, group_size=x.shape[-1])          # x_scale: (N, 1)
    acc = q_x.to(torch.int64) @ q_w.to(torch.int64).T                        # exact, like int32 accumulation
    y = acc.to(torch.float32) * x_scale * w_scale.reshape(1, -1)
    return y if bias is None else y + bias


class _IntegerMatmulsOnly(Watching):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _MATMULS:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    raise AssertionError(f"{self.message} (`{func.overloadpacket.__name__}` ran on {t.dtype})")
        return func(*args, **(kwargs or {}))


_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear",
            "_int_mm", "einsum", "tensordot", "inner", "outer", "ger", "addr", "_weight_int8pack_mm", "convolution"}


def integer_matmuls_only(message: str = "the matrix product must run on integers"):
    """Inside this block, a matrix product (any PyTorch route: ``@``, ``mm``, ``F.linear``, ``einsum``)
    with a floating-point operand raises ``AssertionError``: the test of the integer matmul uses it."""
    return _IntegerMatmulsOnly(message)


def llm_int8_matmul(x: torch.Tensor, w: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() (Dettmers et al. 2022): ``x @ w.T`` with the input features (columns of ``x``)
    holding any |value| > threshold multiplied in float, the rest in int8 with vector-wise scales."""
    outliers = (x.abs() > threshold).any(dim=0)
    y = x[:, outliers] @ w[:, outliers].T
    regular = ~outliers
    if regular.any():
        q_w, w_scale = absmax_quantize(w[:, regular], 8, group_size=int(regular.sum()))
        y = y + quantized_linear(x[:, regular], q_w, w_scale.reshape(-1))
    return y


# The 16 values of NF4 as printed in the QLoRA paper (Dettmers et al. 2023, appendix E).
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values, built from normal quantiles as in the QLoRA paper (8 positive, 7 negative
    and an exact zero, normalised to [-1, 1])."""
    offset = 0.5 * (1 / 32 + 1 / 30)       # the paper's 0.9677 = 1 - offset: midpoints of the 16/15-quantile grids
    positive = torch.special.ndtri(torch.linspace(1 - offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(1 - offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = values / values.abs().max()
    return values.sort().values.to(torch.float32)


def nf4_quantize(w: torch.Tensor, block_size: int = 64):
    """``(codes, absmax)``: each block of ``block_size`` consecutive values of ``w.flatten()`` divided by
    its absmax and mapped to the nearest NF4 value; ``codes`` uint8 (shape of ``w``), ``absmax`` (n_blocks,)."""
    book = nf4_code_book()
    blocks = w.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalised = blocks / absmax[:, None]
    codes = (normalised[..., None] - book).abs().argmin(dim=-1).to(torch.uint8)
    return codes.reshape(w.shape), absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    book = nf4_code_book()
    return (book[codes.long()].reshape(-1, block_size) * absmax[:, None]).reshape(codes.shape)


def double_quantized_bits(block_size: int = 64, scale_block: int = 256, scale_bits: int = 8) -> float:
    """Bits per parameter of NF4 with double quantization: 4 + 8/64 + 32/(64*256) ~ 4.127 (QLoRA)."""
    return 4 + scale_bits / block_size + 32 / (block_size * scale_block)


def ternary_weights(w: torch.Tensor, eps: float = 1e-5):
    """BitNet b1.58's absmean quantizer: ``(w_t, gamma)``, ``w_t`` in {-1, 0, 1} (float), ``gamma = mean|w|``."""
    gamma = w.abs().mean()
    return torch.clamp(torch.round(w / (gamma + eps)), -1, 1), gamma


def bitlinear(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x @ w.T`` with ternary weights and per-token absmax int8 activations, and a straight-through
    estimator: the forward pass is quantized, the backward pass treats both quantizers as the identity."""
    w_t, gamma = ternary_weights(w, eps)
    w_q = w + (w_t * gamma - w).detach()
    x_scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / 127
    x_q = x + (torch.clamp(torch.round(x / x_scale), -127, 127) * x_scale - x).detach()
    return x_q @ w_q.T


class BitLinear(nn.Linear):
    """An ``nn.Linear`` whose forward pass is BitNet b1.58's (``bitlinear``); the bias is kept in float."""

    def forward(self, x):
        y = bitlinear(x, self.weight)
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------------
# The course model: perplexity and weight memory
# ---------------------------------------------------------------------------


def evaluation_windows(tokenizer, n_windows: int = 32, length: int = 129, seed: int = 0) -> torch.Tensor:
    """``n_windows`` fixed windows of ``length`` token ids from the validation part of the corpus
    (the last 10 %, never trained on): the same windows for every format compared."""
    from .pretraining import shakespeare_text, train_val_split

    ids = torch.tensor(tokenizer.encode(shakespeare_text()), dtype=torch.long)
    _, val = train_val_split(ids)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val) - length, (n_windows,), generator=g)
    return torch.stack([val[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over ``windows`` (n, T + 1)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        logits, _ = model(w[:, :-1])
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), w[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(total / count)


def quantizable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The 2-D weight matrices of a GPT (embeddings and linear layers; the tied unembedding once)."""
    seen, out = set(), {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


@torch.no_grad()
def fake_quantize_model(model: nn.Module, quantize: Callable[[torch.Tensor], torch.Tensor],
                        skip: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` whose weight matrices are replaced by ``quantize(weight)`` (a quantize-then-
    dequantize function): what a weight-only quantized model computes, kept in float to run anywhere."""
    twin = copy.deepcopy(model)
    for name, p in quantizable_weights(twin).items():
        if not any(s in name for s in skip):
            p.copy_(quantize(p.detach().float().cpu()).to(p.device, p.dtype))
    return twin


def weight_memory(model: nn.Module, bits_per_weight: float) -> int:
    """Bytes of the model's parameters when every weight matrix is stored at ``bits_per_weight``
    (scales included in that figure) and the rest (biases, LayerNorms) in float32."""
    matrices = quantizable_weights(model)
    ids = {id(p) for p in matrices.values()}
    matrix_params = sum(p.numel() for p in matrices.values())
    other = sum(p.numel() for p in model.parameters() if id(p) not in ids)
    return int(matrix_params * bits_per_weight / 8 + other * 4)


def group_bits(bits: int, group_size: int | None, scale_bits: int = 16, zero_bits: int = 0,
               numel: int | None = None) -> float:
    """Bits per weight of a group-wise format: the integer plus its share of the scale (and zero point)."""
    if group_size is None:
        return bits if numel is None else bits + (scale_bits + zero_bits) / numel
    return bits + (scale_bits + zero_bits) / group_size


def format_comparison(model: nn.Module, windows: torch.Tensor, group_size: int = 32) -> list[dict]:
    """The table of the notebook and of the benchmark: format, bits per weight, memory, perplexity."""
    rows = []
    fp32 = perplexity(model, windows)
    channel = lambda w: w.shape[-1]  # noqa: E731 (one scale per output row)
    variants = [
        ("fp32", None, 32),
        ("bf16", lambda w: w.to(torch.bfloat16).float(), 16),
        ("int8 per channel", lambda w: dequantize(*absmax_quantize(w, 8, channel(w))), 8 + 16 / 128),
        ("int4 per channel", lambda w: dequantize(*absmax_quantize(w, 4, channel(w))), 4 + 16 / 128),
        (f"int4 groups of {group_size}", lambda w: dequantize(*absmax_quantize(w, 4, group_size)),
         group_bits(4, group_size)),
        ("NF4 blocks of 64", lambda w: nf4_dequantize(*nf4_quantize(w, 64), 64), double_quantized_bits()),
    ]
    for name, fn, bits in variants:
        ppl = fp32 if fn is None else perplexity(fake_quantize_model(model, fn), windows)
        rows.append(dict(format=name, bits_per_weight=round(bits, 3),
                         memory_kib=round(weight_memory(model, bits) / 1024, 1),
                         perplexity=round(ppl, 4), vs_fp32=f"{100 * (ppl / fp32 - 1):+.2f} %"))
    return rows


def table(rows: list[dict]):
    """A list of dicts as an HTML table (pandas-free)."""
    from IPython.display import HTML

    head = "".join(f"<th>{k}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r.values()) + "</tr>" for r in rows)
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def quantization_explorer(model: nn.Module, windows: torch.Tensor, layer: str = "transformer.h.0.mlp.c_fc.weight"):
    """Sliders for bits and group size: the histogram of one layer's rounding errors (in units of the
    weights' standard deviation) and the perplexity of the whole model quantized that way."""
    import ipywidgets as widgets
    import plotly.graph_objects as go

    weight = dict(model.named_parameters())[layer].detach().float().cpu()
    bits = widgets.IntSlider(value=4, min=2, max=8, description="bits")
    group = widgets.Dropdown(options=[("per tensor", 0), ("per channel", -1), ("groups of 128", 128),
                                      ("groups of 64", 64), ("groups of 32", 32), ("groups of 16", 16)],
                             value=-1, description="scales")
    fp32 = perplexity(model, windows)
    live = plots.LiveFigure(plots.style(go.Figure(go.Histogram(x=[], nbinsx=80)), height=340))
    live.fig.update_xaxes(title="rounding error / std of the weights")
    live.fig.update_yaxes(title="count")

    def quantizer(w):
        g = {0: None, -1: w.shape[-1]}.get(group.value, group.value)
        if g is not None and w.shape[-1] % g:
            g = w.shape[-1]
        return dequantize(*absmax_quantize(w, bits.value, g))

    def refresh(_=None):
        error = (quantizer(weight) - weight) / weight.std()
        ppl = perplexity(fake_quantize_model(model, quantizer), windows)
        live.update({0: {"x": error.flatten()}},
                     title=f"{layer}: {bits.value}-bit, {group.label} — perplexity {ppl:.3f} (fp32 {fp32:.3f})")

    bits.observe(refresh, "value")
    group.observe(refresh, "value")
    refresh()
    return widgets.VBox([widgets.HBox([bits, group]), live.widget])


def inject_outliers(x: torch.Tensor, channels: Sequence[int], magnitude: float = 60.0) -> torch.Tensor:
    """A copy of activations ``x`` (N, d) in which ``channels`` are large in every row, as the
    feature dimensions of models beyond ~6.7B parameters become (Dettmers et al. 2022)."""
    x = x.clone()
    x[:, list(channels)] *= magnitude / x[:, list(channels)].abs().mean().clamp(min=1e-6)
    return x


# ---------------------------------------------------------------------------
# Error-aware rounding: GPTQ and AWQ on one layer of the course model
# ---------------------------------------------------------------------------


@torch.no_grad()
def layer_inputs(model: nn.Module, module: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The inputs that ``module`` receives while ``model`` reads ``windows``: (tokens, in_features)."""
    seen = []
    handle = module.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    try:
        model(windows[:, :-1].to(next(model.parameters()).device))
    finally:
        handle.remove()
    return torch.cat(seen).float().cpu()


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, x: torch.Tensor, bits: int, damp: float = 0.01) -> torch.Tensor:
    """GPTQ (Frantar et al. 2023) for one layer, per-channel absmax scales: quantize the input columns
    of ``w`` (out, in) one at a time and spread each column's rounding error over the columns not yet
    quantized, weighted by the inverse Hessian of the layer's squared error, ``H = 2 x^T x``.
    Returns the dequantized weight. (The real implementation works in blocks of 128 columns.)"""
    w = w.float().clone()
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)         # (out, 1)
    h = 2 * x.T.double() @ x.double()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    # The upper Cholesky factor of H^-1 holds, row by row, the updates GPTQ applies (its Lemma).
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        q = torch.clamp(torch.round(w[:, j:j + 1] / scale), -qmax, qmax) * scale
        out[:, j:j + 1] = q
        error = (w[:, j:j + 1] - q) / u[j, j]
        w[:, j + 1:] -= error @ u[j:j + 1, j + 1:]
    return out


def rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest with per-channel absmax scales (the baseline GPTQ and AWQ improve on)."""
    return dequantize(*absmax_quantize(w, bits, w.shape[-1]))


def awq_quantize(w: torch.Tensor, x: torch.Tensor, bits: int, alpha: float | None = None,
                 group_size: int | None = None) -> torch.Tensor:
    """AWQ's activation-aware scaling (Lin et al. 2024): multiply input column j of ``w`` by
    ``s_j = mean|x_j| ** alpha`` before rounding and divide after (in a real model the division moves
    into the previous operation), so the columns that meet large activations are rounded more finely.
    ``alpha = 0`` is round-to-nearest; ``alpha=None`` searches 0, 0.1, ..., 1 for the smallest output
    error on ``x``, as AWQ does. Returns the effective (dequantized) weight."""
    g = w.shape[-1] if group_size is None else group_size
    if alpha is None:
        reference = x @ w.T
        candidates = [awq_quantize(w, x, bits, a / 10, group_size) for a in range(11)]
        return min(candidates, key=lambda c: float(((x @ c.T - reference) ** 2).mean()))
    s = x.abs().mean(dim=0).clamp(min=1e-8) ** alpha
    s = s / (s.max() * s.min()).sqrt()              # centre the scales around 1, as AWQ does
    return dequantize(*absmax_quantize(w * s, bits, g)) / s


def keep_channels(w: torch.Tensor, bits: int, channels: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Round ``w`` to ``bits`` except the input columns ``channels``, kept exact (AWQ's first experiment)."""
    g = w.shape[-1] if group_size is None else group_size
    out = dequantize(*absmax_quantize(w, bits, g))
    out[:, channels] = w[:, channels]
    return out


@torch.no_grad()
def awq_salient_experiment(model: nn.Module, windows: torch.Tensor, bits: int = 3, keep: float = 0.01,
                           seed: int = 0) -> dict:
    """Perplexity of the course model with its block linear layers at ``bits`` (per channel), keeping
    ``keep`` of the input channels in full precision: chosen by activation magnitude (AWQ), by weight
    magnitude, or at random; and with AWQ's scaling at a few alphas."""
    g = torch.Generator().manual_seed(seed)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".h." in name}
    calib = windows[: max(2, len(windows) // 4)]
    inputs = {name: layer_inputs(model, m, calib) for name, m in linears.items()}

    def run(make_weight):
        twin = copy.deepcopy(model)
        for name, m in twin.named_modules():
            if name in linears:
                m.weight.copy_(make_weight(m.weight.detach().float().cpu(), inputs[name]).to(m.weight.device))
        return perplexity(twin, windows)

    def n_keep(w):
        return max(1, round(keep * w.shape[1]))

    results = {"fp32": perplexity(model, windows), "round to nearest": run(lambda w, x: rtn(w, bits))}
    results["keep 1% salient (activations)"] = run(
        lambda w, x: keep_channels(w, bits, x.abs().mean(0).topk(n_keep(w)).indices))
    results["keep 1% random"] = run(
        lambda w, x: keep_channels(w, bits, torch.randperm(w.shape[1], generator=g)[:n_keep(w)]))
    results["AWQ scaling (alpha searched per layer)"] = run(lambda w, x: awq_quantize(w, x, bits))
    return results


# ---------------------------------------------------------------------------
# QLoRA: a frozen 4-bit base and a trainable low-rank adapter
# ---------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 codes (blocks of 64) and dequantized on the fly."""

    def __init__(self, linear: nn.Linear, block_size: int = 64):
        super().__init__()
        codes, absmax = nf4_quantize(linear.weight.detach().cpu(), block_size)
        self.register_buffer("codes", codes.to(linear.weight.device))
        self.register_buffer("absmax", absmax.to(linear.weight.device))
        self.register_buffer("book", nf4_code_book().to(linear.weight.device))
        self.block_size = block_size
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return (self.book[self.codes.long()].reshape(-1, self.block_size) * self.absmax[:, None]).reshape(self.codes.shape)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def qlora_model(model: nn.Module, r: int = 8, alpha: float = 16) -> nn.Module:
    """A copy of ``model`` with every block linear layer frozen in NF4 and wrapped in a LoRA adapter;
    only the adapters train (the embeddings and LayerNorms are frozen too). The adapter is Phase 5's
    ``utils.lora.LoRALinear``."""
    from .lora import LoRALinear as lora

    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    for block in twin.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, lora(NF4Linear(child), r, alpha))
    return twin


def fine_tune(model: nn.Module, ids: torch.Tensor, steps: int, batch_size: int = 16, block: int = 64,
              lr: float = 3e-3, seed: int = 0) -> list[float]:
    """A few AdamW steps of next-token training of ``model``'s trainable parameters on random windows of ``ids``."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (batch_size,), generator=g)
        x = torch.stack([ids[s:s + block] for s in starts.tolist()]).to(device)
        y = torch.stack([ids[s + 1:s + block + 1] for s in starts.tolist()]).to(device)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------
# BitNet b1.58: a tiny ternary model against a full-precision one
# ---------------------------------------------------------------------------


def ternary_gpt(config) -> nn.Module:
    """The course GPT with every linear layer of its blocks a ``BitLinear`` (embeddings stay in float,
    as in BitNet)."""
    from .transformer import GPT

    model = GPT(config)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    new = BitLinear(child.in_features, child.out_features, bias=child.bias is not None)
                    new.load_state_dict(child.state_dict())
                    setattr(parent, name, new)
    return model


def train_tiny_models(ids: torch.Tensor, steps: int, lr: float = 3e-3, seed: int = 0) -> dict[str, list[float]]:
    """Train the same tiny GPT twice from the same initialisation, in full precision and with ternary
    (BitLinear) weights; return both loss curves."""
    from .transformer import GPT, GPTConfig

    vocab = int(ids.max()) + 1
    config = GPTConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=4, n_embd=64)
    curves = {}
    for name, make in (("full precision", GPT), ("ternary weights (BitNet b1.58)", ternary_gpt)):
        torch.manual_seed(seed)
        model = make(config).to(runtime.get_device())
        # BitNet trains with a larger learning rate than its full-precision twin (section 2 of the paper)
        curves[name] = fine_tune(model, ids, steps, batch_size=8, block=64,
                                 lr=lr * (2 if "ternary" in name else 1), seed=seed)
    return curves


# ---------------------------------------------------------------------------
# Weight-only int8 with real kernels: PyTorch's fused kernel, and torchao (when installed)
# ---------------------------------------------------------------------------


def int8_weight_only(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The course's weight-only int8 format: per-channel absmax, ``(q int8 (out, in), scale float32 (out,))``."""
    q, scale = absmax_quantize(w, 8, w.shape[-1])
    return q, scale.reshape(-1)


def weight_int8pack_available() -> bool:
    """Whether this PyTorch has the fused weight-only int8 kernel ``torch._weight_int8pack_mm`` on the CPU
    (a private operator: it exists since torch 2.3 and may change)."""
    fn = getattr(torch, "_weight_int8pack_mm", None)
    if fn is None:
        return False
    try:
        fn(torch.ones(1, 8), torch.ones(8, 8, dtype=torch.int8), torch.ones(8))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def cpu_description() -> str:
    """The CPU, its cores and the load average: timings on a busy machine are slower (say so with them)."""
    import os
    import platform
    from pathlib import Path

    name = platform.processor() or "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"CPU: {name}, {os.cpu_count()} cores{load} (a load above the core count slows every timing)"


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    import statistics
    import time

    fn()                                              # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4)


@torch.no_grad()
def int8_matmul_timings(shapes: Sequence[tuple[int, int, int]] = ((1, 512, 128), (64, 512, 128), (1, 4096, 4096)),
                        repeats: int = 5, seed: int = 0) -> list[dict]:
    """Time ``y = x @ W.T`` for each ``(batch, out, in)`` shape, on one CPU thread, with W in fp32 and in
    the course's int8 format computed three ways:

    * the course's route: dequantize the whole matrix to fp32, then an fp32 matmul;
    * ``torch._weight_int8pack_mm(x, q, scale)``, PyTorch's fused kernel (it reads the int8 weights and
      converts them tile by tile, never writing an fp32 copy), with fp32 and with bf16 activations;
    * and the bf16 matmul, the kernel's fair baseline for bf16 activations.

    Median milliseconds of ``repeats`` runs, plus the largest difference of the fused kernel's fp32 output
    from the course's (the same product computed in another order: rounding differences only)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    kernel = weight_int8pack_available()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch, n_out, n_in in shapes:
            x = torch.randn(batch, n_in, generator=g)
            w = torch.randn(n_out, n_in, generator=g) * 0.02
            q, scale = int8_weight_only(w)
            course = lambda: x @ (q.float() * scale[:, None]).T          # noqa: E731
            row = {"shape (batch x out x in)": f"{batch} x {n_out} x {n_in}",
                   "fp32 matmul (ms)": _median_ms(lambda: x @ w.T, repeats),
                   "dequantize, then fp32 matmul (ms)": _median_ms(course, repeats)}
            if kernel:
                xb, wb, sb = x.bfloat16(), w.bfloat16(), scale.bfloat16()
                row["_weight_int8pack_mm, fp32 x (ms)"] = _median_ms(lambda: torch._weight_int8pack_mm(x, q, scale), repeats)
                row["_weight_int8pack_mm, bf16 x (ms)"] = _median_ms(lambda: torch._weight_int8pack_mm(xb, q, sb), repeats)
                row["bf16 matmul (ms)"] = _median_ms(lambda: xb @ wb.T, repeats)
                reference = course()
                error = (torch._weight_int8pack_mm(x, q, scale) - reference).abs().max() / reference.abs().max()
                row["kernel vs course, max |diff| / max |y|"] = f"{float(error):.1e}"
            row["weights fp32 / int8 (MiB)"] = f"{4 * n_out * n_in / 2**20:.2f} / {(n_out * n_in + 4 * n_out) / 2**20:.2f}"
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def block_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers inside the transformer blocks (not the tied unembedding)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".h." in f".{name}"]


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


@torch.no_grad()
def torchao_comparison(model: nn.Module, windows: torch.Tensor) -> dict | None:
    """torchao's weight-only int8 (``quantize_`` with ``Int8WeightOnlyConfig``: symmetric, one scale per
    output channel) against the course's ``int8_weight_only``, on the same layers of ``model`` (every
    linear layer of its blocks): ``{"rows": [...], "summary": "..."}`` with the perplexities on
    ``windows``, the logits' distance from fp32 and how far the two sets of weights are apart. ``None``
    when torchao is not installed or does not import beside this torch release. torchao is optional
    (`pip install torchao==0.18.0` beside torch 2.13): once installed, `transformers` and `peft` import it
    too, and on a CPU build its import prints warnings to stderr, which nbgrader counts as a failed test."""
    if not torchao_available():
        return None
    import contextlib
    import io
    import logging
    import time

    # torchao's import reports CUDA-only extensions it cannot load on a CPU build, and torch logs a
    # deprecation notice about one of its enums: neither concerns this comparison
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import torchao
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception:  # a torchao built for another torch release (`make lab CONSTRAINTS=`) may not import
        return None
    finally:
        pytree_log.setLevel(level)

    names = set(block_linears(model))
    model = copy.deepcopy(model).float().cpu().eval()
    ours = copy.deepcopy(model)
    for name in names:
        layer = ours.get_submodule(name)
        layer.weight.copy_(dequantize(*absmax_quantize(layer.weight, 8, layer.weight.shape[-1])))
    theirs = copy.deepcopy(model)
    quantize_(theirs, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)

    steps, same_codes, count, scale_ratio = [], 0, 0, []
    for name in sorted(names):
        q_ours, s_ours = int8_weight_only(model.get_submodule(name).weight)
        qt = theirs.get_submodule(name).weight
        steps.append(float(((ours.get_submodule(name).weight - qt.dequantize().float()).abs() / s_ours[:, None]).max()))
        same_codes += int((qt.qdata.reshape(q_ours.shape).long() == q_ours.long()).sum())
        count += q_ours.numel()
        scale_ratio.append(float((s_ours / qt.scale.float().reshape(-1)).mean()))
    x = windows[:, :-1].cpu()
    logits = {key: m(x)[0] for key, m in (("fp32", model), ("course", ours), ("torchao", theirs))}
    rows = []
    for key, label, m in (("fp32", "fp32", model), ("course", "course int8 (absmax / 127)", ours),
                          ("torchao", f"torchao {torchao.__version__} Int8WeightOnlyConfig", theirs)):
        start = time.perf_counter()
        ppl = perplexity(m, windows)
        rows.append({"block linear layers": label, "perplexity": round(ppl, 4),
                     "max |logit - fp32 logit|": round(float((logits[key] - logits["fp32"]).abs().max()), 5),
                     "evaluation (s)": round(time.perf_counter() - start, 2)})
    summary = (f"torchao's scale is the course's times {1 / (sum(scale_ratio) / len(scale_ratio)):.4f} "
               f"(absmax / 127.5 with codes in [-128, 127], against absmax / 127 in [-127, 127]); "
               f"{same_codes / count:.1%} of the int8 codes are identical, the dequantized weights differ by at "
               f"most {max(steps):.2f} course step; logits of the two int8 models differ by at most "
               f"{float((logits['course'] - logits['torchao']).abs().max()):.4f}.")
    return {"rows": rows, "summary": summary}
