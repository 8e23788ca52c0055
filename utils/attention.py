"""Phase 1 helpers: toy data, figures, an explorer and measuring tools for attention.

Nothing here solves a graded exercise. Where a helper needs attention itself it
calls PyTorch's ``F.scaled_dot_product_attention`` as the trusted reference,
or takes your function as an argument.

* the digit-reversal task: ``reversal_batch``, ``ReversalModel``, ``train_reversal``, ``alignment_figure``
* why the 1/sqrt(d) scale: ``saturation_figure``
* references and test tools: ``reference_weights``, ``naive_attention``, ``copy_mha_weights``,
  ``forbid_builtins`` and ``forbid_mask_builders`` (the shortcuts switched off), ``NewMemory``, ``TiledReads`` and ``check_one_pass`` (how
  tiled attention reads K and V)
* the interactive ``attention_explorer``
* the memory/time comparison: ``benchmark_attention``, ``benchmark_figures``
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from . import checks, plots, runtime
from .trace import Watching

# ---------------------------------------------------------------------------
# The digit-reversal task (exercise 1)
# ---------------------------------------------------------------------------

N_DIGITS = 10
BOS = N_DIGITS  # the token that starts every decoder input
VOCAB_SIZE = N_DIGITS + 1


def reversal_batch(batch_size: int, length: int, generator: torch.Generator | None = None):
    """Random digit sequences and their reversals: ``src``, ``tgt`` of shape (batch_size, length).

    Reversal is the classic alignment test: output position i must look at
    input position length-1-i, so a model that learned to attend shows an
    anti-diagonal.
    """
    src = torch.randint(0, N_DIGITS, (batch_size, length), generator=generator)
    return src, src.flip(-1)


class ReversalModel(nn.Module):
    """A small GRU encoder-decoder that reads the source through an attention module.

    ``attention(query, keys, mask)`` must map a decoder state ``query`` (B, d_model)
    and the encoder states ``keys`` (B, T, d_model) to ``(context (B, d_model),
    weights (B, T))``, which is what exercise 1's ``AdditiveAttention`` does.

    At output step i the decoder state of the previous step asks the attention
    module where to look (Bahdanau et al. 2014, section 3.1); the context it
    gets back is fed to the GRU together with the previous output token.
    """

    def __init__(self, attention: nn.Module, d_model: int = 64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.encoder = nn.GRU(d_model, d_model, batch_first=True)
        self.attention = attention
        self.decoder = nn.GRUCell(2 * d_model, d_model)
        self.readout = nn.Linear(2 * d_model, VOCAB_SIZE)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor):
        """Teacher-forced decoding: logits (B, T_out, VOCAB_SIZE) and attention weights (B, T_out, T_in)."""
        keys, last = self.encoder(self.embed(src))
        state = last[0]
        previous = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
        logits, weights = [], []
        for i in range(tgt.shape[1]):
            context, w = self.attention(state, keys)
            state = self.decoder(torch.cat([self.embed(previous[:, i]), context], dim=-1), state)
            logits.append(self.readout(torch.cat([state, context], dim=-1)))
            weights.append(w)
        return torch.stack(logits, dim=1), torch.stack(weights, dim=1)


def train_reversal(model: ReversalModel, steps: int, *, length: int = 8, batch_size: int = 64,
                   lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train ``model`` to reverse digit sequences; return the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in runtime.progress(range(steps), desc="training"):
        src, tgt = reversal_batch(batch_size, length, generator)
        logits, _ = model(src, tgt)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tgt.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def alignment_figure(model: ReversalModel, length: int = 8, seed: int = 1):
    """Heatmap of the attention weights for one fresh sequence, with the accuracy in the title."""
    model.eval()
    src, tgt = reversal_batch(1, length, torch.Generator().manual_seed(seed))
    logits, weights = model(src, tgt)
    accuracy = (logits.argmax(-1) == tgt).float().mean().item()
    return plots.heatmap(weights[0], x=[str(d) for d in src[0].tolist()], y=[str(d) for d in tgt[0].tolist()],
                         title=f"Where each output digit looks (teacher-forced accuracy {accuracy:.0%})",
                         xaxis_title="input digit (key)", yaxis_title="output digit (query)",
                         zmin=0, zmax=1, height=420, width=480)


# ---------------------------------------------------------------------------
# References built on PyTorch's own attention
# ---------------------------------------------------------------------------

def reference_weights(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                      is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The attention weights (..., T_q, T_k) that ``F.scaled_dot_product_attention`` uses.

    The built-in returns only ``weights @ v``; with the identity matrix as ``v``
    that product is the weights themselves.
    """
    t_k = k.shape[-2]
    eye = torch.eye(t_k, dtype=q.dtype, device=q.device).expand(*q.shape[:-2], t_k, t_k)
    return F.scaled_dot_product_attention(q, k, eye, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Textbook attention, as PyTorch's "math" backend computes it: the full (T_q, T_k) score and
    weight matrices are built. (Written out rather than selected with ``sdpa_kernel``, a context
    manager, so that it also runs inside ``checks.LargestTensor``, which switches those off.)"""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


@torch.no_grad()
def saturation_figure(dims: Sequence[int] = (4, 16, 64, 256, 1024), n_keys: int = 32, n_queries: int = 256,
                      seed: int = 0):
    """Why divide by sqrt(d): the largest attention weight of random queries and keys, with and without it.

    Entries of q and k are N(0, 1), so q.k has variance d: without the scale the
    softmax gets ever more peaked (close to one-hot) as d grows.
    """
    generator = torch.Generator().manual_seed(seed)
    scaled, unscaled = [], []
    for d in dims:
        q = torch.randn(n_queries, d, generator=generator)
        k = torch.randn(n_keys, d, generator=generator)
        scaled.append(reference_weights(q, k).amax(-1).mean().item())
        unscaled.append(reference_weights(q, k, scale=1.0).amax(-1).mean().item())
    return plots.line_chart(list(dims), {"q·k / √d": scaled, "q·k (no scale)": unscaled}, log_x=True,
                            title=f"Average largest weight over {n_keys} random keys",
                            xaxis_title="head dimension d", yaxis_title="largest softmax weight")


@torch.no_grad()
def copy_mha_weights(source: nn.MultiheadAttention, target: nn.Module) -> nn.Module:
    """Copy the parameters of PyTorch's ``nn.MultiheadAttention`` into a module with
    ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` linear layers; return ``target``.

    PyTorch stores the three input projections stacked in one ``in_proj_weight``
    of shape (3 * d_model, d_model), in the order query, key, value.
    """
    weights = source.in_proj_weight.chunk(3)
    biases = source.in_proj_bias.chunk(3)
    for layer, weight, bias in zip((target.q_proj, target.k_proj, target.v_proj), weights, biases):
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    target.out_proj.weight.copy_(source.out_proj.weight)
    target.out_proj.bias.copy_(source.out_proj.bias)
    return target


# ---------------------------------------------------------------------------
# Tools for the tests: switch the shortcuts off, and watch how tiled attention reads K and V
# ---------------------------------------------------------------------------

# What would do an attention exercise's work in one call: PyTorch's attention (functional, module,
# multi-head), any `transformers` code, and this module's own references.
ATTENTION_SHORTCUTS = (
    "torch.nn.functional.scaled_dot_product_attention",
    "torch.nn.functional.multi_head_attention_forward",
    "torch.nn.MultiheadAttention",
    "transformers.*",
    reference_weights,
    naive_attention,
)
SOFTMAX_SHORTCUTS = ("torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax",
                     "torch.special.softmax", "torch.nn.functional.log_softmax", "torch.nn.Softmax")
# The ready-made masks: PyTorch's causal biases and square-mask builder, transformers' mask helpers.
MASK_SHORTCUTS = (
    "torch.nn.attention.bias.causal_lower_right",
    "torch.nn.attention.bias.causal_upper_left",
    "torch.nn.attention.bias.CausalBias",
    "torch.nn.Transformer.generate_square_subsequent_mask",
    "torch.nn.modules.transformer._generate_square_subsequent_mask",
    "transformers.*",
)


@contextlib.contextmanager
def forbid_builtins(*extra, softmax: bool = True, attention: bool = True):
    """Inside this block PyTorch's attention (and, if ``softmax``, every built-in softmax) raises,
    and so do ``transformers``, this module's references and the ``extra`` targets.

    The tests of an exercise that asks you to write attention or a softmax yourself run your
    function inside it (``checks.shortcuts_off``), so calling the built-in cannot pass.
    ``attention=False`` keeps ``F.scaled_dot_product_attention`` available (exercise 4 may use it)
    while multi-head attention stays off.
    """
    if attention:
        targets = ATTENTION_SHORTCUTS
        fragments = ["scaled_dot_product", "_safe_softmax", "multi_head_attention"]
    else:
        targets = tuple(t for t in ATTENTION_SHORTCUTS if t != "torch.nn.functional.scaled_dot_product_attention")
        fragments = ["multi_head_attention"]
    if softmax:
        targets += SOFTMAX_SHORTCUTS
        fragments.append("softmax")
    warm_up_dispatch()
    what = ("PyTorch's softmax and attention functions are" if softmax else
            "PyTorch's attention functions are" if attention else "PyTorch's multi-head attention is")
    message = f"{what} switched off while this test runs: this exercise asks you to write them yourself"
    with checks.shortcuts_off(*targets, *extra, ops=fragments, message=message) as guard:
        yield guard


def forbid_mask_builders():
    """A block inside which the ready-made masks (``MASK_SHORTCUTS``) raise: exercise 3 builds them."""
    warm_up_dispatch()
    return checks.shortcuts_off(*MASK_SHORTCUTS, message="the ready-made masks are switched off while this test "
                                "runs: this exercise asks you to build them from positions yourself")


def warm_up_dispatch() -> None:
    """Import what PyTorch loads the first time a dispatch mode runs (``torch._dynamo``, seconds).

    Done before a watched block starts, so that the import is not slowed down by the call watcher."""
    import torch._dynamo  # noqa: F401


class NewMemory(Watching):
    """Record the largest NEW tensor that any PyTorch operator returns inside the block
    (``largest_bytes``, ``largest_shape``). Views and in-place results reuse memory that already
    existed (a slice of ``k`` is not a copy of it), so they do not count.

    Enter it before ``forbid_builtins``, whose guard then keeps it on: a dispatch mode cannot be
    entered or left inside a ``checks.shortcuts_off`` block.
    """

    def __init__(self):
        super().__init__()
        warm_up_dispatch()
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.record(func, tree_flatten((args, kwargs))[0], tree_flatten(out)[0])
        return out

    def record(self, func, inputs: list, outputs: list) -> None:
        in_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor):
                size = tensor.untyped_storage().nbytes()
                if tensor.untyped_storage().data_ptr() not in in_storages and size > self.largest_bytes:
                    self.largest_bytes, self.largest_shape = size, tuple(tensor.shape)


class TiledReads(NewMemory):
    """Watch how a function reads the keys ``k`` and values ``v`` of ONE sequence.

    ``k`` (T_k, d) or (1, T_k, d) and ``v`` (T_k, d_v) or (1, T_k, d_v) must be contiguous. For every
    PyTorch operator that computes from them (views excluded: a slice costs nothing), it records
    which rows it read: ``reads["keys"]`` and ``reads["values"]`` are lists of ``(first, last)`` row
    ranges, one per operator. Like ``NewMemory`` it also records the largest new tensor.

    Tiled attention with an online softmax scores each block of keys once and reads each block of
    values once: ``ceil(T_k / block)`` reads of at most ``block`` rows each, for the keys and for the
    values, and nothing larger than a few blocks is created.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.sources = {}
        for name, tensor in (("keys", k), ("values", v)):
            if not tensor.is_contiguous() or math.prod(tensor.shape[:-2]) != 1:
                raise ValueError("TiledReads watches one contiguous sequence: (T, d) or (1, T, d)")
            self.sources[name] = tensor
        self.reads: dict[str, list[tuple[int, int]]] = {"keys": [], "values": []}

    @staticmethod
    def _rows(view: torch.Tensor, source: torch.Tensor) -> tuple[int, int]:
        row = source.shape[-1]
        first = view.storage_offset() - source.storage_offset()
        last = first + sum((n - 1) * s for n, s in zip(view.shape, view.stride()) if n > 0)
        return first // row, last // row

    def record(self, func, inputs: list, outputs: list) -> None:
        super().record(func, inputs, outputs)
        out_storages = {t.untyped_storage().data_ptr() for t in outputs if isinstance(t, torch.Tensor)}
        for name, source in self.sources.items():
            pointer = source.untyped_storage().data_ptr()
            if pointer in out_storages:
                continue  # an alias or an in-place change of the input, not a read
            for tensor in inputs:
                if isinstance(tensor, torch.Tensor) and tensor.numel() and tensor.untyped_storage().data_ptr() == pointer:
                    self.reads[name].append(self._rows(tensor, source))


def check_one_pass(tiled_attention: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   block_size: int) -> torch.Tensor:
    """Run ``tiled_attention(q, k, v, block_size)`` on one sequence, shortcuts off, and fail unless it
    works like FlashAttention: every key and every value read exactly once, at most ``block_size``
    rows at a time, and no tensor created larger than two blocks (``2 * block_size * max(T_q, d, d_v)``
    numbers). Returns the output (as a plain tensor) for the caller to compare."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    limit = 2 * block_size * max(t_q, q.shape[-1], v.shape[-1]) * q.element_size()
    with TiledReads(k, v) as record, forbid_builtins(softmax=False):
        out = tiled_attention(q, k, v, block_size)
    out = checks.plain(out, "tiled_attention's output")
    name = f"tiled_attention with T_q={t_q}, T_k={t_k}, block_size={block_size}"
    for what, reads in record.reads.items():
        widest = max(reads, key=lambda r: r[1] - r[0], default=(0, -1))
        if widest[1] - widest[0] + 1 > block_size:
            raise AssertionError(
                f"{name}: one step read {what} {widest[0]}..{widest[1]} ({widest[1] - widest[0] + 1} rows) at once. "
                f"Work on one block of at most {block_size} {what} at a time: the point of the exercise is that "
                "the scores of all the keys never exist together (for one query row either).")
        times = torch.zeros(t_k, dtype=torch.long)
        for first, last in reads:
            times[first:last + 1] += 1
        if (times == 0).any():
            raise AssertionError(f"{name}: {int((times == 0).sum())} of the {t_k} {what} were never read.")
        if (times > 1).any():
            raise AssertionError(
                f"{name}: some {what} were read {int(times.max())} times ({len(reads)} reads for "
                f"{-(-t_k // block_size)} blocks). The online softmax makes ONE pass: each block of keys is "
                "scored once and its values added at once, with the running maximum, denominator and "
                "accumulator rescaled by exp(m - m_new) when the maximum grows. A first pass for the maximum "
                "and a second for the sums is the two-pass softmax, which reads K twice.")
    if record.largest_bytes > limit:
        raise AssertionError(
            f"{name}: the largest tensor your function created has shape {record.largest_shape} "
            f"({record.largest_bytes} bytes), more than two blocks ({limit} bytes). Keep only a block of "
            "scores and the running statistics; do not copy, scale or concatenate the whole of K or V.")
    return out


# ---------------------------------------------------------------------------
# The attention explorer
# ---------------------------------------------------------------------------

EXPLORER_TOKENS = "the cat sat on the mat because the cat was tired <pad> <pad> <pad>".split()
HEAD_NAMES = ("previous token", "same word", "first token", "random (untrained)")


def toy_heads(tokens: Sequence[str] = EXPLORER_TOKENS, d: int = 16, strength: float = 3.0, seed: int = 0):
    """Queries and keys (4, T, d) of four attention heads built by hand, one per pattern in ``HEAD_NAMES``.

    Each hand-made head puts ``strength`` (after the 1/sqrt(d) scale) on the
    keys it is looking for, so the patterns are clear but not one-hot:
    ``previous token`` matches one-hot positions shifted by one, ``same word``
    matches one-hot word identities, ``first token`` gives every query the same
    vector that only key 0 answers. Trained models grow heads like these
    (Clark et al. 2019 describe previous-token heads, and heads parking attention on special tokens, in BERT).
    """
    t = len(tokens)
    words = {w: i for i, w in enumerate(dict.fromkeys(tokens))}
    if max(t, len(words)) > d:
        raise ValueError(f"d={d} is too small for {t} tokens")
    boost = strength * math.sqrt(d)
    position = torch.eye(d)[:t]
    identity = torch.eye(d)[[words[w] for w in tokens]]
    previous = torch.eye(d)[[max(i - 1, 0) for i in range(t)]]
    first_query = torch.zeros(t, d)
    first_query[:, 0] = 1.0
    first_key = torch.zeros(t, d)
    first_key[0, 0] = 1.0
    generator = torch.Generator().manual_seed(seed)
    q = torch.stack([boost * previous, boost * identity, boost * first_query, torch.randn(t, d, generator=generator)])
    k = torch.stack([position, identity, first_key, torch.randn(t, d, generator=generator)])
    return q, k


def attention_explorer(sdpa: Callable | None = None, causal_mask: Callable | None = None,
                       padding_mask: Callable | None = None):
    """Interactive heatmaps of four attention heads on a short sentence.

    Sliders and buttons change the temperature (logits divided by tau before the
    softmax) and the mask (none, causal, or padding: the three ``<pad>`` keys hidden).
    The weights come from PyTorch's built-in attention, or from your own
    ``sdpa(q, k, v, mask) -> (output, weights)``, ``causal_mask(t)`` and
    ``padding_mask(lengths, t)`` when you choose "yours"; if they are not
    finished yet (or fail), the explorer says so and shows PyTorch's weights.
    """
    import ipywidgets as widgets

    tokens = EXPLORER_TOKENS
    t = len(tokens)
    n_real = sum(tok != "<pad>" for tok in tokens)
    q, k = toy_heads(tokens)
    v = torch.zeros(k.shape)  # the explorer shows the weights only

    def builtin(mask_kind, tau):
        key_is_real = torch.tensor([tok != "<pad>" for tok in tokens])
        mask = key_is_real.expand(t, t) if mask_kind == "padding" else None
        return reference_weights(q / tau, k, attn_mask=mask, is_causal=mask_kind == "causal")

    def yours(mask_kind, tau):
        mask = {"none": lambda: None, "causal": lambda: causal_mask(t),
                "padding": lambda: padding_mask(torch.tensor([n_real]), t)}[mask_kind]()
        return sdpa(q / tau, k, v, mask)[1]

    temperature = widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.05,
                                         description="temperature τ", continuous_update=True,
                                         style={"description_width": "initial"})
    masking = widgets.ToggleButtons(options=["none", "causal", "padding"], description="mask")
    source = widgets.ToggleButtons(options=["PyTorch", "yours"], description="weights from",
                                   disabled=sdpa is None)
    status = widgets.HTML()
    figure = plots.LiveFigure(plots.heatmap_grid([torch.zeros(t, t)] * len(HEAD_NAMES), HEAD_NAMES, x=tokens, y=tokens,
                                            title="attention weights", height=400))

    def refresh(_=None):
        tau, mask_kind = temperature.value, masking.value
        note = ""
        weights = None
        if source.value == "yours":
            try:
                weights = yours(mask_kind, tau)
            except NotImplementedError:
                note = "Your functions are not finished yet: showing PyTorch's weights."
            except Exception as error:  # a half-written function: show why, keep exploring
                note = f"Your functions raised {type(error).__name__}: {error}. Showing PyTorch's weights."
        if weights is None:
            weights = builtin(mask_kind, tau)
        status.value = f"<i>{note}</i>" if note else ""
        figure.update({i: {"z": w} for i, w in enumerate(weights.detach())},
                      f"softmax(q·kᵀ / (√d · τ)), τ = {tau:.2f}, mask: {mask_kind}")

    for control in (temperature, masking, source):
        control.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([temperature, masking]), source, status, figure.widget])


# ---------------------------------------------------------------------------
# Measuring memory and time (exercise 5)
# ---------------------------------------------------------------------------

def time_call(function: Callable, *args, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``function(*args)`` over ``repeats`` runs (after one warm-up run)."""
    function(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def benchmark_attention(implementations: Mapping[str, Callable], lengths: Sequence[int], *, d: int = 64,
                        repeats: int = 3, time_only: Sequence[str] = (), seed: int = 0) -> dict:
    """Time each ``implementation(q, k, v)`` and record the largest tensor it creates, for each length T.

    q, k, v have shape (1, T, d). Returns ``{"lengths": [...], "seconds": {name: [...]},
    "largest_mb": {name: [...]}}``; an implementation that raises ``NotImplementedError``
    gets ``None`` entries (a gap in the figures). Memory is not recorded for the
    names in ``time_only``: a fused kernel's internal buffers are invisible from Python.
    """
    generator = torch.Generator().manual_seed(seed)
    results = {"lengths": list(lengths), "seconds": {n: [] for n in implementations},
               "largest_mb": {n: [] for n in implementations if n not in time_only}}
    for t in runtime.progress(lengths, desc="lengths"):
        q, k, v = (torch.randn(1, t, d, generator=generator) for _ in range(3))
        for name, function in implementations.items():
            try:
                if name not in time_only:
                    with checks.LargestTensor() as record:
                        function(q, k, v)
                    results["largest_mb"][name].append(record.largest_bytes / 2**20)
                results["seconds"][name].append(time_call(function, q, k, v, repeats=repeats))
            except NotImplementedError:
                results["seconds"][name].append(None)
                if name not in time_only:
                    results["largest_mb"][name].append(None)
    return results


def benchmark_figures(results: dict):
    """Two line charts (largest intermediate tensor, time) of a ``benchmark_attention`` result."""
    where = "measured on this machine, CPU"
    memory = plots.line_chart(results["lengths"], results["largest_mb"], log_x=True, log_y=True,
                              title=f"Largest tensor created during the call ({where})",
                              xaxis_title="sequence length T", yaxis_title="MiB")
    seconds = plots.line_chart(results["lengths"], {n: [None if s is None else 1000 * s for s in ys]
                                                    for n, ys in results["seconds"].items()},
                               log_x=True, log_y=True, title=f"Time per call ({where})",
                               xaxis_title="sequence length T", yaxis_title="milliseconds")
    return memory, seconds
