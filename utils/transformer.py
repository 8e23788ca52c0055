"""Phase 2 helpers: a reference GPT for the later phases, and the figures and experiments of Phase 2.

The reference model (``GPTConfig``, ``GPT``) is the course's "previous chapter":
Phases 3 to 8 train, fine-tune, shard and quantize it, so that they work even if
you skipped an exercise of Phase 2. It is a decoder-only transformer with the
layer structure of GPT-2 (Radford et al. 2019): learned positions, pre-LN blocks,
a GELU MLP four times wider than the model, and the unembedding tied to the
token embedding (Press & Wolf 2017). ``GPT.from_hf_gpt2`` loads the weights of a
``transformers`` ``GPT2LMHeadModel``, and ``GPT.generate`` has a KV cache.

Phase 2's own exercises are NOT solved here (the graded GPT is the one you
write); this module holds the reference pieces and what the notebook needs to draw and measure:

* the reference model: ``GPTConfig``, ``GPT``, ``KVCache``, ``sample``; loading GPT-2's
  weights: ``load_gpt2_weights``, ``tiny_gpt2``
* reference Llama-style pieces: ``apply_rope``, ``RMSNorm``
* depth and residuals: ``ArrangedBlock``, ``deep_stack``, ``gradient_norms_per_layer``,
  ``gradient_norm_figure``, ``train_deep_stacks``, ``LiveLossCurve``
* encoder versus decoder: ``influence_matrix``, ``influence_figure``
* positional encodings: ``positional_heatmap``, ``positional_explorer``
* the KV-cache exercise: ``CachedLM``, ``ReplayLM``, ``time_generation``, ``generation_time_figure``
* tools for the tests: ``forbid_builtin_norms``, ``shortcuts_off`` and the shortcut lists (``POSITION_SHORTCUTS``,
  ``NORM_SHORTCUTS``, ``REFERENCE_MODEL``, ``CACHE_SHORTCUTS``, ``GENERATION_SHORTCUTS``,
  ``MODEL_BUILDERS``)
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks, plots, runtime

# ---------------------------------------------------------------------------
# The reference GPT
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    """The size of a GPT. The defaults make a small character-level model (about 0.8 M parameters)."""

    vocab_size: int = 65
    block_size: int = 64      # longest context the learned positions cover
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True         # biases in the linear layers and LayerNorms, as in GPT-2
    gelu: str = "tanh"        # GPT-2's tanh approximation; "none" is the exact (erf) GELU of BERT and nanoGPT


class KVCache:
    """The keys and values that every layer has already computed, so that generation
    feeds only the newest token through the model.

    ``layers[i]`` is ``None`` or a pair ``(keys, values)`` of shape (B, n_head, length, head_dim).
    """

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        """How many positions are cached (the position of the next token)."""
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append the new keys and values of ``layer``; return all its keys and values so far."""
        if self.layers[layer] is not None:
            past_k, past_v = self.layers[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the past.

    One linear layer ``c_attn`` makes queries, keys and values at once (GPT-2's layout),
    and PyTorch's fused ``F.scaled_dot_product_attention`` does the rest.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = 0 if cache.layers[layer] is None else cache.layers[layer][0].shape[2]
            k, v = cache.extend(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        elif T == 1:
            # The newest token may look at every cached key: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # Several new tokens after a cached prefix: query i sits at position past + i.
            # (is_causal would align the triangle to the top-left corner, which is wrong here.)
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: widen four times, GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU; matching it keeps logits identical to GPT-2's.
        # The exact GELU ("none") differs by at most 5e-4 and ran 2-4x faster (forward, backward) on a
        # CPU whose tanh is not vectorised (tests/benchmark_pretraining.py uses it, as nanoGPT does).
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LN decoder block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only, pre-LN, learned positions, GELU MLP (4x), tied embedding/unembedding.

    >>> model = GPT(GPTConfig(vocab_size=65, block_size=64))
    >>> logits, loss = model(idx, targets)      # idx, targets: (B, T) token ids
    >>> model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=10)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): reading a token in and writing it out share one matrix.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled initialisation: every block adds two outputs to the residual stream,
        # so the layers writing into it start smaller as the stack gets deeper.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, vocab_size) for token ids ``idx`` (B, T), and the mean next-token
        cross-entropy against ``targets`` (B, T) if given (else ``None``).

        With a ``cache``, ``idx`` holds only the new tokens; they are placed after the
        ``cache.length`` cached positions, and their keys and values are added to the cache.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} positions, but the model knows only block_size="
                             f"{self.config.block_size}: crop the context first.")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; return (B, T + max_new_tokens).

        ``temperature`` divides the logits (0 means greedy: always the most likely token),
        ``top_k`` keeps only the k most likely tokens. With ``use_cache`` the keys and
        values of past tokens are kept, so each step feeds one token; the tokens are the
        same as without the cache (given the same random state). The model is put in
        eval mode while generating (dropout off) and restored afterwards.
        """
        was_training = self.training
        self.eval()
        block = self.config.block_size
        cache = None
        try:
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits, _ = self(idx[:, -block:])
                elif cache is None or cache.length >= block:
                    # Learned positions are absolute: once the window slides, every cached key has
                    # the wrong position, so the cache is rebuilt from the cropped context.
                    cache = KVCache(self.config.n_layer)
                    logits, _ = self(idx[:, -block:], cache=cache)
                else:
                    logits, _ = self(idx[:, -1:], cache=cache)
                next_token = sample(logits[:, -1, :], temperature, top_k, generator)
                idx = torch.cat([idx, next_token], dim=1)
        finally:
            self.train(was_training)
        return idx

    def num_parameters(self, non_embedding: bool = False) -> int:
        """The number of parameters (the tied embedding/unembedding counted once).

        ``non_embedding=True`` leaves out the token and position embeddings, the
        count that scaling laws are written in (Kaplan et al. 2020).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    @classmethod
    @torch.no_grad()
    def from_hf_gpt2(cls, hf_model) -> "GPT":
        """A ``GPT`` holding the weights of a ``transformers`` ``GPT2LMHeadModel`` (same logits).

        GPT-2 stores its linear layers as ``Conv1D`` with the weight transposed
        (in_features, out_features), so those are transposed on the way in.
        """
        hf = hf_model.config
        if hf.activation_function != "gelu_new" or hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
            raise ValueError("only the standard GPT-2 architecture (gelu_new, 1/sqrt(d) scaling) is supported")
        config = GPTConfig(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer,
                           n_head=hf.n_head, n_embd=hf.n_embd, dropout=0.0, bias=True)
        return load_gpt2_weights(cls(config), hf_model)


# ---------------------------------------------------------------------------
# Reference Llama-style pieces: rotary positions and RMSNorm
# ---------------------------------------------------------------------------

def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021), pairs of NEIGHBOURING features (2i, 2i+1).

    ``x`` is (..., T, d) with d even. ``positions`` is (T,), shared by every leading dimension, or
    (B, T) when ``x`` is (B, ..., T, d) (one row of positions per sequence, e.g. after left padding).
    Pair i of row t is rotated by ``positions[t] * base ** (-2i / d)``; the angles are computed in
    float64 and the result has the dtype of ``x``. Any other shape of ``positions`` raises
    ``ValueError``: broadcasting it silently would rotate by the wrong angles.
    """
    t, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE rotates pairs of features: the last dimension of x must be even, not {d}")
    if positions.dim() == 1 and positions.shape[0] == t:
        shape = (t, d // 2)
    elif positions.dim() == 2 and x.dim() >= 3 and tuple(positions.shape) == (x.shape[0], t):
        shape = (x.shape[0],) + (1,) * (x.dim() - 3) + (t, d // 2)
    else:
        raise ValueError(f"positions must have shape (T,) = ({t},) or (B, T) = ({x.shape[0]}, {t}) for x of shape "
                         f"{tuple(x.shape)}; got {tuple(positions.shape)}")
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angles = (positions.to(device=x.device, dtype=torch.float64)[..., None] * theta).reshape(shape)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., 0::2], x[..., 1::2]
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): ``weight * x / sqrt(mean(x^2) + eps)``.

    As in Llama, a low-precision input (bfloat16, float16) is normalised in float32 and cast back:
    squaring and averaging in bfloat16 loses about twice as many digits as the cast alone.
    """

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, V), as a (B, 1) tensor.

    ``temperature`` 0 picks the most likely token; ``top_k`` samples among the k most likely.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def load_gpt2_weights(model: nn.Module, hf_model) -> nn.Module:
    """Copy the weights of a ``transformers`` ``GPT2LMHeadModel`` into ``model``; return ``model``.

    ``model`` must name its parameters as GPT-2 does (``wte``, ``wpe``, ``h.0.ln_1``,
    ``h.0.attn.c_attn``, ``h.0.attn.c_proj``, ``h.0.ln_2``, ``h.0.mlp.c_fc``, ``h.0.mlp.c_proj``,
    ``ln_f``, ``lm_head``), with or without GPT-2's ``transformer.`` prefix, and use
    ``nn.Linear`` layers: GPT-2's ``Conv1D`` stores its weight transposed, so those are
    transposed on the way in. Names that do not match are reported all at once.
    """
    source = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    target = model.state_dict(keep_vars=True)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    missing, wrong_shape, used = [], [], set()
    tied = "lm_head.weight" in target and any(
        target["lm_head.weight"] is target[n] for n in ("wte.weight", "transformer.wte.weight") if n in target)
    for name, tensor in source.items():
        if name == "lm_head.weight" and (tied or "lm_head.weight" not in target):
            continue  # GPT-2 ties it to wte: copying wte is enough
        here = name if name in target else name.removeprefix("transformer.")
        if here not in target:
            missing.append(here)
            continue
        value = tensor.t() if name.endswith(conv1d) else tensor
        if tuple(value.shape) != tuple(target[here].shape):
            wrong_shape.append(f"{here}: GPT-2 {tuple(value.shape)}, yours {tuple(target[here].shape)}")
            continue
        target[here].data.copy_(value)
        used.add(here)
    unexpected = [n for n in target if n not in used and not (tied and n == "lm_head.weight")
                  and not n.endswith((".attn.bias", ".attn.masked_bias"))]
    problems = []
    if missing:
        problems.append(f"your model has no parameter named {', '.join(missing[:6])}"
                        + (" ..." if len(missing) > 6 else ""))
    if wrong_shape:
        problems.append("shapes differ: " + "; ".join(wrong_shape[:4]))
    if unexpected:
        problems.append(f"GPT-2 has no parameter for your {', '.join(unexpected[:6])}")
    if problems:
        raise AssertionError("Cannot load GPT-2's weights: " + "; ".join(problems)
                             + ". Use the attribute names given in the exercise.")
    return model


def tiny_gpt2(vocab_size: int = 101, n_positions: int = 32, n_embd: int = 48, n_layer: int = 2,
              n_head: int = 4, seed: int = 0):
    """A randomly initialised ``transformers`` ``GPT2LMHeadModel`` (no download), in eval mode.

    Its weights are drawn five times wider than GPT-2's (std 0.1 instead of 0.02), and its
    LayerNorm weights and biases are randomised too (GPT-2 starts them at 1 and 0), so that a
    model that skips or misplaces a LayerNorm, or uses the exact GELU, gives visibly different logits.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # a small vocabulary makes it warn about GPT-2's special token ids
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
    return model


# ---------------------------------------------------------------------------
# Depth: residual connections and where the LayerNorm goes
# ---------------------------------------------------------------------------

ARRANGEMENTS = ("pre-LN", "post-LN", "pre-LN, no residual", "no LN, residual", "no LN, no residual")


class ArrangedBlock(nn.Module):
    """The reference block's sub-layers (attention, MLP, two LayerNorms), wired one of four ways:

    * ``"pre-LN"`` (GPT-2, most LLMs):   ``x = x + attn(ln_1(x))``;  ``x = x + mlp(ln_2(x))``
    * ``"post-LN"`` (Vaswani et al. 2017): ``x = ln_1(x + attn(x))``;  ``x = ln_2(x + mlp(x))``
    * ``"pre-LN, no residual"``:          ``x = attn(ln_1(x))``;      ``x = mlp(ln_2(x))``
    * ``"no LN, residual"``:              ``x = x + attn(x)``;        ``x = x + mlp(x)``
    * ``"no LN, no residual"``:           ``x = attn(x)``;            ``x = mlp(x)``
    """

    def __init__(self, config: GPTConfig, arrangement: str = "pre-LN"):
        super().__init__()
        if arrangement not in ARRANGEMENTS:
            raise ValueError(f"arrangement must be one of {ARRANGEMENTS}")
        self.arrangement = arrangement
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arrangement == "pre-LN":
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        if self.arrangement == "post-LN":
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        if self.arrangement == "pre-LN, no residual":
            return self.mlp(self.ln_2(self.attn(self.ln_1(x))))
        if self.arrangement == "no LN, residual":
            x = x + self.attn(x)
            return x + self.mlp(x)
        return self.mlp(self.attn(x))


def deep_stack(arrangement: str, n_layer: int = 24, n_embd: int = 64, n_head: int = 4, vocab_size: int = 64,
               block_size: int = 32, seed: int = 0) -> nn.Module:
    """A language model made of ``n_layer`` ``ArrangedBlock``s, initialised like GPT-2 (std 0.02)."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = nn.ModuleDict(dict(
        wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
        h=nn.ModuleList(ArrangedBlock(config, arrangement) for _ in range(n_layer)),
        ln_f=nn.LayerNorm(n_embd), head=nn.Linear(n_embd, vocab_size, bias=False)))
    model.apply(GPT._init_weights)
    return model


def deep_stack_loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, keep: list | None = None):
    """Next-token cross-entropy of a ``deep_stack`` model. If ``keep`` is a list, the input of
    every block is appended to it with ``retain_grad()``, so its gradient can be read after backward."""
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1], device=idx.device))
    for block in model.h:
        if keep is not None:
            x.retain_grad()
            keep.append(x)
        x = block(x)
    logits = model.head(model.ln_f(x))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device | str = "cpu"):
    """Run the block on one CPU thread (restored afterwards; nothing changes on a GPU).

    The small models of this phase are made of many tiny operations: a second thread only adds
    synchronisation, and on a busy machine waiting for a free core. One thread was about twice
    as fast here.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gradient_norms_per_layer(arrangement: str, n_layer: int = 24, n_embd: int = 64, batch_size: int = 16,
                             seq_len: int = 32, seeds: Sequence[int] = (0, 1, 2)) -> list[float]:
    """At initialisation, the norm of the loss gradient with respect to the input of each block,
    ‖∂loss/∂x_l‖ (layer 0 first), averaged over ``seeds``.

    This is the signal that tells layer l how to change: if it is 0, nothing below layer l learns.
    The loss is the cross-entropy of predicting random tokens: at initialisation the data do not
    matter, the wiring does.
    """
    totals = torch.zeros(n_layer, dtype=torch.float64)
    for seed in seeds:
        with one_thread_on_cpu():
            totals += _gradient_norms(arrangement, n_layer, n_embd, batch_size, seq_len, seed)
    return (totals / len(seeds)).tolist()


def _gradient_norms(arrangement, n_layer, n_embd, batch_size, seq_len, seed) -> torch.Tensor:
    model = deep_stack(arrangement, n_layer=n_layer, n_embd=n_embd, block_size=seq_len, seed=seed)
    generator = torch.Generator().manual_seed(1000 + seed)
    idx = torch.randint(0, 64, (batch_size, seq_len + 1), generator=generator)
    inputs: list[torch.Tensor] = []
    deep_stack_loss(model, idx[:, :-1], idx[:, 1:], keep=inputs).backward()
    return torch.stack([x.grad.double().norm() for x in inputs])


def gradient_norm_figure(norms: dict[str, Sequence[float]]):
    """Log-scale line chart of ``{arrangement: gradient norm per layer}``; exact zeros leave gaps."""
    n_layer = len(next(iter(norms.values())))
    # A gradient that underflowed to exactly 0 has no place on a log axis: leave a gap.
    shown = {name: [v if v > 0 else None for v in values] for name, values in norms.items()}
    return plots.line_chart(list(range(n_layer)), shown, log_y=True,
                            title=f"Gradient reaching each layer at initialisation ({n_layer} layers)",
                            xaxis_title="layer l (0 = next to the input)", yaxis_title="‖∂loss/∂x_l‖")


def train_deep_stacks(arrangements: Sequence[str], steps: int, n_layer: int = 6, lr: float = 3e-3,
                      seed: int = 0, on_step: Callable | None = None,
                      device: torch.device | str | None = None) -> dict[str, list[float]]:
    """Train one ``deep_stack`` per arrangement on the same toy task; return their losses.

    The task (predict the token that appeared 8 positions earlier, in random sequences) needs
    attention to work, so a stack whose gradients do not reach the lower layers learns slowly.
    ``on_step(name, step, loss)`` is called after every step (for a live figure).
    """
    device = runtime.get_device() if device is None else torch.device(device)
    with one_thread_on_cpu(device):
        return _train_deep_stacks(arrangements, steps, n_layer, lr, seed, on_step, device)


def _train_deep_stacks(arrangements, steps, n_layer, lr, seed, on_step, device) -> dict[str, list[float]]:
    losses = {}
    for name in arrangements:
        model = deep_stack(name, n_layer=n_layer, seed=seed).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        losses[name] = []
        for step in runtime.progress(range(steps), desc=name):
            idx, targets = (t.to(device) for t in copy_task_batch(16, 32, generator))
            loss = deep_stack_loss(model, idx, targets)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses[name].append(loss.item())
            if on_step is not None:
                on_step(name, step, loss.item())
    return losses


def copy_task_batch(batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                    vocab_size: int = 64, lag: int = 8):
    """Random tokens ``idx`` (B, T) and targets where target t is the token at t + 1 - lag
    (the first ``lag - 1`` targets are ``-100``: ignored by the cross-entropy)."""
    idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    targets = torch.full_like(idx, -100)
    targets[:, lag - 1:] = idx[:, : seq_len - lag + 1]
    return idx, targets


class LiveLossCurve:
    """A loss chart that grows while training runs: call ``curve(name, step, loss)`` after each step.

    One line per name; points are sent to the browser every ``every`` steps (and by ``flush()``).
    """

    def __init__(self, names: Sequence[str], title: str = "Training loss", every: int = 10, height: int = 360):
        from IPython.display import display

        self.names = list(names)
        self.every = every
        self.points = {name: ([], []) for name in self.names}
        fig = plots.line_chart([], {name: [] for name in self.names}, title=title, xaxis_title="step",
                               yaxis_title="cross-entropy", markers=False, height=height)
        self.live = plots.LiveFigure(fig)
        if not runtime.is_grading():
            display(self.live.widget)

    def __call__(self, name: str, step: int, loss: float) -> None:
        xs, ys = self.points[name]
        xs.append(step)
        ys.append(loss)
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        """Send every point recorded so far to the figure."""
        self.live.update({i: {"x": self.points[n][0], "y": self.points[n][1]} for i, n in enumerate(self.names)})


# ---------------------------------------------------------------------------
# Encoder versus decoder: who influences whom
# ---------------------------------------------------------------------------

@torch.no_grad()
def influence_matrix(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """How much each output position moves when one input position is nudged.

    ``fn`` maps ``x`` (1, T, d) to (1, T, d). Entry [i, j] of the (T, T) result is
    ``|fn(x with position j nudged)[i] - fn(x)[i]|``, relative to the size of the nudge.
    A causal (decoder) block gives a lower-triangular matrix; a bidirectional (encoder) one a full matrix.
    """
    generator = torch.Generator().manual_seed(0)
    base = fn(x)
    t = x.shape[1]
    result = torch.zeros(t, t)
    for j in range(t):
        nudged = x.clone()
        nudged[:, j] += eps * torch.randn(x.shape[-1], generator=generator)
        result[:, j] = (fn(nudged) - base)[0].norm(dim=-1) / eps
    return result


def influence_figure(causal: torch.Tensor, bidirectional: torch.Tensor):
    """Two heatmaps side by side: ``influence_matrix`` of a causal and of a bidirectional block."""
    top = float(max(causal.max(), bidirectional.max()))
    t = causal.shape[0]
    fig = plots.heatmap_grid([causal, bidirectional], ["decoder (causal mask)", "encoder (no mask)"],
                             x=list(range(t)), y=list(range(t)), zmin=0.0, zmax=top,
                             title="How far output i (row) moves when input j (column) is nudged", height=380)
    fig.update_xaxes(title="input position j")
    fig.update_yaxes(title="output position i", col=1)
    return fig


# ---------------------------------------------------------------------------
# Positional encodings: figures and an explorer (they take YOUR functions)
# ---------------------------------------------------------------------------

def positional_heatmap(encoding: torch.Tensor, title: str = "Sinusoidal positional encoding"):
    """Heatmap of a (T, d) positional encoding: one row per position, one column per feature."""
    return plots.heatmap(encoding, title=title, xaxis_title="feature", yaxis_title="position",
                         zmin=-1, zmax=1, colorscale="RdBu", height=420)


def positional_explorer(sinusoidal: Callable, rope: Callable, n_positions: int = 128):
    """Sliders for the position m, the model width d and the base; two panels:

    * left, from your ``sinusoidal(n_positions, d, base)``: the similarity PE[m]·PE[n] / (d/2)
      of position m with every position n. The bump sits at n = m and has the same shape wherever m is.
    * right, from your ``rope(x, positions, base)``: where each of the d/2 rotating pairs of a
      vector points at position m. Fast pairs (low index) spin; slow pairs barely move.

    If your functions are not finished (or raise), the explorer says so.
    """
    import ipywidgets as widgets
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.1,
                        subplot_titles=["similarity of position m with position n (sinusoidal)",
                                        "the rotating pairs at position m (RoPE)"])
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="PE[m]·PE[n] / (d/2)"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="position m", marker=dict(size=10, color="crimson")),
                  row=1, col=1)
    circle = torch.linspace(0, 2 * math.pi, 100)
    fig.add_trace(go.Scatter(x=circle.cos().tolist(), y=circle.sin().tolist(), mode="lines",
                             line=dict(color="lightgrey"), showlegend=False), row=1, col=2)
    fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="pair i (colour: fast → slow)",
                             marker=dict(size=9, color=[], colorscale="Viridis")), row=1, col=2)
    fig.update_xaxes(title="position n", row=1, col=1)
    fig.update_yaxes(range=[-1.1, 1.1], row=1, col=1)
    fig.update_xaxes(range=[-1.2, 1.2], row=1, col=2, scaleanchor="y2", scaleratio=1)
    fig.update_yaxes(range=[-1.2, 1.2], row=1, col=2)
    plots.style(fig, height=420).update_layout(legend=dict(orientation="h", y=-0.2))
    live = plots.LiveFigure(fig)

    position = widgets.IntSlider(value=20, min=0, max=n_positions - 1, description="position m")
    width = widgets.Dropdown(options=[8, 16, 32, 64, 128], value=32, description="d")
    base = widgets.FloatLogSlider(value=10000, base=10, min=1, max=6, step=0.25, description="base")
    status = widgets.HTML()

    def refresh(_=None):
        m, d, b = position.value, width.value, base.value
        notes, changes = [], {}
        try:
            pe = sinusoidal(n_positions, d, b)
            similarity = pe @ pe[m] / (d / 2)
            changes[0] = {"x": list(range(n_positions)), "y": similarity}
            changes[1] = {"x": [m], "y": [float(similarity[m])]}
        except Exception as error:  # unfinished or broken: keep the explorer usable
            notes.append(f"sinusoidal: {type(error).__name__} {error}".strip())
        try:
            unit = torch.zeros(1, d)
            unit[0, 0::2] = 1.0  # every pair starts at (1, 0)
            rotated = rope(unit, torch.tensor([m]), b)[0]
            changes[3] = {"x": rotated[0::2], "y": rotated[1::2]}
            live.fig.data[3].marker.color = list(range(d // 2))
        except Exception as error:
            notes.append(f"rope: {type(error).__name__} {error}".strip())
        live.update(changes, title=f"m = {m}, d = {d}, base = {b:,.0f}")
        status.value = "<i>Not available yet: " + "; ".join(notes) + "</i>" if notes else ""

    for control in (position, width, base):
        control.observe(refresh, names="value")
    refresh()
    return widgets.VBox([widgets.HBox([position, width, base]), status, live.widget])


# ---------------------------------------------------------------------------
# KV cache (exercise 7): a small model that uses YOUR cached attention
# ---------------------------------------------------------------------------

class CachedBlock(nn.Module):
    """A pre-LN block whose attention follows the KV-cache protocol ``attn(x, past) -> (y, present)``."""

    def __init__(self, attention: Callable[[int, int], nn.Module], config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = attention(config.n_embd, config.n_head)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, past=None):
        y, present = self.attn(self.ln_1(x), past)
        x = x + y
        return x + self.mlp(self.ln_2(x)), present


class CachedLM(nn.Module):
    """A small GPT built around an attention class you pass in, for the KV-cache exercise.

    ``attention(d_model, n_heads)`` must build a module whose ``forward(x, past=None)``
    returns ``(y, present)``, ``present = (keys, values)`` of all positions so far.
    ``model(idx, past=None)`` returns ``(logits, presents)``: with ``past`` (the ``presents``
    of the previous call) ``idx`` holds only the new tokens, placed after the cached ones.
    """

    def __init__(self, attention: Callable[[int, int], nn.Module], vocab_size: int = 64, block_size: int = 128,
                 n_layer: int = 2, n_embd: int = 32, n_head: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                                n_head=n_head, n_embd=n_embd)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(CachedBlock(attention, self.config) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # A larger initialisation than GPT-2's, so that an untrained model's greedy choices are decisive.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.5 / math.sqrt(n_embd) if isinstance(module, nn.Linear) else 1.0)

    def forward(self, idx: torch.Tensor, past: list | None = None):
        start = 0 if past is None else past[0][0].shape[-2]
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"{start + idx.shape[1]} positions, but block_size is {self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(start, start + idx.shape[1], device=idx.device))
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, None if past is None else past[i])
            presents.append(present)
        return self.ln_f(x) @ self.wte.weight.t(), presents


def time_generation(generate: Callable, model: nn.Module, lengths: Sequence[int], prompt_length: int = 8,
                    repeats: int = 1, seed: int = 0) -> dict:
    """Seconds that ``generate(model, prompt, n, use_cache=...)`` takes for each n in ``lengths``,
    with and without the cache: ``{"lengths", "with cache", "without cache", "same tokens"}``.

    On a CPU it runs on one thread (see ``one_thread_on_cpu``), the fastest way for a model this small.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length), generator=generator).to(device)
    results = {"lengths": list(lengths), "with cache": [], "without cache": [], "same tokens": True}
    with one_thread_on_cpu(device):
        _time_generation(generate, model, prompt, lengths, repeats, device, results)
    return results


def _time_generation(generate, model, prompt, lengths, repeats, device, results) -> None:
    for n in runtime.progress(lengths, desc="generating"):
        outputs = {}
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                outputs[use_cache] = generate(model, prompt, n, use_cache=use_cache)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
            results["with cache" if use_cache else "without cache"].append(best)
        results["same tokens"] &= bool(torch.equal(outputs[True], outputs[False]))


def generation_time_figure(results: dict):
    """Line chart of ``time_generation`` results (milliseconds per generated sequence)."""
    return plots.line_chart(results["lengths"], {k: [1000 * s for s in results[k]] for k in ("without cache", "with cache")},
                            title="Greedy generation time (measured on this machine)",
                            xaxis_title="new tokens generated", yaxis_title="milliseconds")


class ReplayLM(nn.Module):
    """A model with exercise 7's calling convention, ``model(idx, past) -> (logits, past)``,
    that keeps no cache at all: its ``past`` is the tokens seen so far, and every call runs a
    reference ``GPT`` on the whole sequence. The tokens your ``generate`` picks must therefore
    equal ``GPT.generate(..., temperature=0)``. ``calls`` records, for every call, the number of
    tokens passed in and whether a ``past`` came with them.
    """

    def __init__(self, config: GPTConfig | None = None, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.gpt = GPT(config or GPTConfig(vocab_size=50, block_size=256, n_layer=2, n_head=2, n_embd=32))
        self.config = self.gpt.config
        self.calls: list[tuple[int, bool]] = []

    def forward(self, idx: torch.Tensor, past: torch.Tensor | None = None):
        self.calls.append((idx.shape[1], past is not None))
        tokens = idx if past is None else torch.cat([past, idx], dim=1)
        logits, _ = self.gpt(tokens)
        return logits[:, -idx.shape[1]:], tokens


# ---------------------------------------------------------------------------
# Tools for the tests
# ---------------------------------------------------------------------------

def _own_functions(*targets) -> tuple:
    """``targets`` with every class expanded into its methods and every decorator removed.

    ``checks.shortcuts_off`` recognises a function by its code; a decorated function's code is the
    decorator's wrapper (``torch.no_grad``'s, ``dataclass``'s ``__repr__``), shared with every other
    function decorated the same way, including the student's. Names (strings) are kept as they are.
    """
    functions = []
    for target in targets:
        if isinstance(target, str):
            functions.append(target)
            continue
        members = vars(target).values() if isinstance(target, type) else [target]
        for member in members:
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                functions += [part for part in (member.fget, member.fset) if part is not None]
            elif callable(member) and not isinstance(member, type):
                functions.append(inspect.unwrap(member))
    return tuple(functions)


# What would do an exercise's work in one call, switched off while the tests run your code
# (``checks.shortcuts_off``). Any ``transformers`` code is off in every Phase 2 exercise.
POSITION_SHORTCUTS = _own_functions("transformers.*", apply_rope)
NORM_SHORTCUTS = _own_functions("transformers.*", RMSNorm, "torch.nn.LayerNorm", "torch.nn.RMSNorm", "torch.nn.GroupNorm",
                  "torch.nn.functional.layer_norm", "torch.nn.functional.rms_norm",
                  "torch.nn.functional.group_norm", "torch.nn.functional.batch_norm",
                  "torch.nn.functional.instance_norm", "torch.layer_norm", "torch.rms_norm", "torch.group_norm")
NORM_OPS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm")
# The reference GPT and everything built on it (exercises 5 and 7 must run the student's classes).
REFERENCE_MODEL = _own_functions("transformers.*", GPT, Block, CausalSelfAttention, MLP, KVCache, sample, ArrangedBlock,
                   CachedBlock, CachedLM, load_gpt2_weights)
# The reference attention with its cache, and the reference generation (exercise 7). ``CachedLM`` and
# ``ReplayLM``, which the tests wrap around the student's code, stay available.
CACHE_SHORTCUTS = _own_functions("transformers.*", CausalSelfAttention, KVCache, Block)
GENERATION_SHORTCUTS = _own_functions("transformers.*", GPT.generate, sample, KVCache)
# Building a model to count its parameters (exercise 6 asks for the formula).
MODEL_BUILDERS = _own_functions("transformers.*", "torch.nn.Module.__init__", GPT, GPTConfig)


SWITCHED_OFF = {
    "positions": (POSITION_SHORTCUTS, "transformers' rotary helpers and the course's apply_rope are switched off while "
                  "this test runs: this exercise asks you to compute the encoding yourself"),
    "ffn": (("transformers.*",), "transformers' feed-forward blocks are switched off while this test runs: this "
            "exercise asks you to write SwiGLU yourself"),
    "model": (REFERENCE_MODEL, "the course's reference GPT (utils.transformer) and transformers are switched off "
              "while your model runs: use your own classes"),
    "count": (MODEL_BUILDERS, "building a model to count its parameters is switched off while this test runs "
              "(tx.GPT, transformers, any nn.Module, even on the meta device): derive the formula"),
    "cache": (CACHE_SHORTCUTS, "the course's reference attention and KVCache are switched off while this test runs: "
              "this exercise asks you to write the cache yourself"),
    "generation": (GENERATION_SHORTCUTS, "the reference GPT's generate and sample are switched off while this test "
                   "runs: this exercise asks you to write the generation loop yourself"),
}


def shortcuts_off(exercise: str, *extra):
    """``checks.shortcuts_off`` with what would do a Phase 2 exercise's work: ``SWITCHED_OFF[exercise]``."""
    targets, message = SWITCHED_OFF[exercise]
    return checks.shortcuts_off(*targets, *extra, message=message)


@contextlib.contextmanager
def forbid_builtin_norms(*extra):
    """Inside this block PyTorch's normalisations (LayerNorm, RMSNorm, GroupNorm, batch and instance
    norm: modules, functionals and operators), ``transformers``, this module's ``RMSNorm`` and the
    ``extra`` targets raise. The tests of the exercise that asks you to write LayerNorm and RMSNorm
    run your modules inside it.
    """
    import torch._dynamo  # noqa: F401  (what the first dispatch mode imports: not inside the watched block)

    message = ("PyTorch's LayerNorm and RMSNorm are switched off while this test runs: "
               "this exercise asks you to write them yourself")
    with checks.shortcuts_off(*NORM_SHORTCUTS, *extra, ops=NORM_OPS, message=message) as guard:
        yield guard
