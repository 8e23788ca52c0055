"""Phase 2 helpers for the Llama exercise: a reference Llama, and Hugging Face's Llama as the yardstick.

A Llama decoder (Touvron et al. 2023) is the GPT of Phase 2 with four changes: RMSNorm instead of
LayerNorm, rotary positions applied to the queries and keys inside every attention layer instead of a
learned position table, a SwiGLU feed-forward block, and grouped-query attention (Ainslie et al. 2023):
``n_kv_head`` key/value heads, each shared by ``n_head // n_kv_head`` query heads. No linear layer has a
bias and the output head is not tied to the embedding.

* ``LlamaConfig``: the sizes; ``hf_config`` and ``tiny_llama`` build a randomly initialised
  ``transformers`` ``LlamaForCausalLM`` of those sizes (nothing is downloaded)
* ``load_llama_weights``: copy such a model's weights into a model that uses the exercise's names,
  permuting the query and key rows from Hugging Face's rotate-half RoPE layout to the interleaved one
  (``to_interleaved``, ``to_rotate_half``)
* the reference model: ``SwiGLU``, ``GroupedQueryAttention``, ``LlamaBlock``, ``Llama`` (built on
  ``utils.transformer.apply_rope`` and ``utils.transformer.RMSNorm``), and ``attention_reference``, the
  attention computed from given weights (the tests' yardstick for one layer)
* ``rope_rotate_half``: RoPE in Hugging Face's pairing, for the lesson on the two conventions
* tools for the tests: ``LLAMA_SHORTCUTS``, ``shortcuts_off``

The reference model follows the KV-cache protocol of Phase 2's exercise 7: ``model(idx, past)`` returns
``(logits, presents)``; with ``past`` (the previous call's ``presents``) the new tokens sit after the
cached ones, so their rotary angles start at the cached length (the position offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks
from .transformer import RMSNorm, _own_functions, apply_rope


@dataclass
class LlamaConfig:
    """The sizes of a Llama. ``n_head`` must be a multiple of ``n_kv_head`` and divide ``n_embd``."""

    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2
    n_embd: int = 32
    d_hidden: int = 64          # SwiGLU's hidden width (Llama: about 8/3 of n_embd, rounded up)
    rope_base: float = 10000.0  # theta_i = rope_base ** (-2i / head_dim)
    norm_eps: float = 1e-6      # RMSNorm's epsilon (Llama 2 uses 1e-5)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head or self.head_dim % 2:
            raise ValueError(f"need n_embd % n_head == 0, n_head % n_kv_head == 0 and an even head_dim; got "
                             f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")


# ---------------------------------------------------------------------------
# Hugging Face's Llama, built locally
# ---------------------------------------------------------------------------

def hf_config(config: LlamaConfig):
    """The ``transformers`` ``LlamaConfig`` of the same sizes: no biases, untied head, eager attention."""
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.d_hidden,
                         num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                         num_key_value_heads=config.n_kv_head, max_position_embeddings=4096,
                         rope_theta=config.rope_base, rms_norm_eps=config.norm_eps, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, attn_implementation="eager",
                         bos_token_id=0, eos_token_id=0, pad_token_id=None, initializer_range=0.2)


def tiny_llama(config: LlamaConfig | None = None, seed: int = 0):
    """A randomly initialised ``transformers`` ``LlamaForCausalLM`` (no download), in eval mode.

    Its weights are drawn ten times wider than Llama's (std 0.2 instead of 0.02) and its RMSNorm weights
    are randomised (Llama starts them at 1), so that a model that skips a norm, pairs the wrong heads or
    rotates the wrong features gives visibly different logits.
    """
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(config or LlamaConfig())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query or key projection, reordered from rotate-half to interleaved RoPE pairs.

    Within each head of ``d`` rows, Hugging Face's layout pairs row ``i`` with row ``i + d/2``; the
    interleaved layout (the RoFormer paper's, Meta's original Llama code's, exercise 2's) pairs rows
    ``2i`` and ``2i + 1``. Row ``c * d/2 + i`` moves to ``2i + c``.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``to_interleaved`` (the permutation Hugging Face's conversion script applies)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_HF_NAMES = {"mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up", "mlp.down_proj": "mlp.w_down"}


@torch.no_grad()
def load_llama_weights(model: nn.Module, hf_model, rope: str = "interleaved") -> nn.Module:
    """Copy the weights of a ``transformers`` ``LlamaForCausalLM`` into ``model``; return ``model``.

    ``model`` must use the exercise's names: ``embed_tokens``, ``layers.<i>.input_layernorm``,
    ``layers.<i>.self_attn.{q,k,v,o}_proj``, ``layers.<i>.post_attention_layernorm``,
    ``layers.<i>.mlp.{w_gate,w_up,w_down}`` (exercise 4's SwiGLU), ``norm``, ``lm_head`` (untied).
    With ``rope="interleaved"`` (the default) the rows of every query and key projection are permuted
    from Hugging Face's rotate-half layout to the interleaved one (``to_interleaved``), so that a model
    rotating neighbouring pairs, as exercise 2's ``apply_rope`` does, gives Hugging Face's logits;
    ``rope="rotate-half"`` copies them unchanged. Problems are reported all at once.
    """
    if rope not in ("interleaved", "rotate-half"):
        raise ValueError("rope must be 'interleaved' or 'rotate-half'")
    hf = hf_model.config
    target = model.state_dict(keep_vars=True)
    if "lm_head.weight" in target and "embed_tokens.weight" in target \
            and target["lm_head.weight"] is target["embed_tokens.weight"]:
        raise AssertionError("Cannot load Llama's weights: your lm_head shares its weight with embed_tokens. "
                             "Llama's output head is untied: give lm_head its own nn.Linear(n_embd, vocab_size, "
                             "bias=False).")
    missing, wrong_shape, used = [], [], set()
    for name, tensor in hf_model.state_dict().items():
        here = name.removeprefix("model.")
        for theirs, ours in _HF_NAMES.items():
            here = here.replace(theirs, ours)
        if here not in target:
            missing.append(here)
            continue
        value = tensor
        if rope == "interleaved" and here.endswith("self_attn.q_proj.weight"):
            value = to_interleaved(tensor, hf.num_attention_heads)
        elif rope == "interleaved" and here.endswith("self_attn.k_proj.weight"):
            value = to_interleaved(tensor, hf.num_key_value_heads)
        if tuple(value.shape) != tuple(target[here].shape):
            wrong_shape.append(f"{here}: Llama {tuple(value.shape)}, yours {tuple(target[here].shape)}")
            continue
        target[here].data.copy_(value)
        used.add(here)
    unexpected = [n for n in target if n not in used]
    problems = []
    if missing:
        problems.append(f"your model has no parameter named {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if wrong_shape:
        problems.append("shapes differ: " + "; ".join(wrong_shape[:4]))
    if unexpected:
        biases = [n for n in unexpected if n.endswith(".bias")]
        problems.append(f"Llama has no parameter for your {', '.join(unexpected[:6])}"
                        + (" (Llama's linear layers have no biases: bias=False)" if biases else ""))
    if problems:
        raise AssertionError("Cannot load Llama's weights: " + "; ".join(problems)
                             + ". Use the attribute names given in the exercise.")
    return model


# ---------------------------------------------------------------------------
# RoPE in Hugging Face's pairing (for the lesson on the two conventions)
# ---------------------------------------------------------------------------

def rope_rotate_half(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE with features ``i`` and ``i + d/2`` paired (GPT-NeoX's and Hugging Face's Llama code).

    The same frequencies and angles as ``utils.transformer.apply_rope``; only the pairing differs:
    ``rope_rotate_half(x[..., P]) == apply_rope(x)[..., P]`` where ``P`` lists the even features, then
    the odd ones.
    """
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * theta
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


# ---------------------------------------------------------------------------
# The reference Llama
# ---------------------------------------------------------------------------

class SwiGLU(nn.Module):
    """``w_down(silu(w_gate(x)) * w_up(x))``, no biases (Shazeer 2020)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def attention_reference(x: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                        o_weight: torch.Tensor, n_head: int, n_kv_head: int, rope_base: float = 10000.0,
                        past: tuple[torch.Tensor, torch.Tensor] | None = None, *, rope: str = "interleaved",
                        kv_heads: str = "grouped", offset: bool = True):
    """Grouped-query causal self-attention with interleaved RoPE, from explicit weights: ``(y, (keys, values))``.

    ``x`` (B, T, C) holds the new positions; ``past`` is ``None`` or the ``(keys, values)`` of earlier
    calls, each (B, n_kv_head, T_past, head_dim), keys already rotated. The new tokens sit at positions
    ``T_past ... T_past + T - 1``; query head ``h`` reads key/value head ``h // (n_head // n_kv_head)``;
    new query ``i`` sees keys ``0 ... T_past + i``. Written with an explicit softmax, so that it is exact
    in float64.

    The keyword arguments give what a common mistake computes, for the tests' messages:
    ``rope="rotate-half"`` pairs features ``i`` and ``i + d/2``, ``kv_heads="tiled"`` gives query head ``h``
    key/value head ``h % n_kv_head`` (``repeat`` instead of ``repeat_interleave``), ``offset=False`` rotates
    the new tokens as if they sat at positions ``0 ... T - 1``.
    """
    B, T, _ = x.shape
    head_dim = q_weight.shape[0] // n_head
    q = F.linear(x, q_weight).view(B, T, n_head, head_dim).transpose(1, 2)
    k = F.linear(x, k_weight).view(B, T, n_kv_head, head_dim).transpose(1, 2)
    v = F.linear(x, v_weight).view(B, T, n_kv_head, head_dim).transpose(1, 2)
    t_past = 0 if past is None else past[0].shape[2]
    start = t_past if offset else 0
    positions = torch.arange(start, start + T, device=x.device)
    rotate = apply_rope if rope == "interleaved" else rope_rotate_half
    q, k = rotate(q, positions, rope_base), rotate(k, positions, rope_base)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    group = n_head // n_kv_head

    def per_query_head(t):
        return t.repeat_interleave(group, dim=1) if kv_heads == "grouped" else t.repeat(1, group, 1, 1)

    scores = q @ per_query_head(k).transpose(-2, -1) / math.sqrt(head_dim)
    hidden = torch.ones(T, t_past + T, dtype=torch.bool, device=x.device).triu(diagonal=t_past + 1)
    weights = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    y = (weights @ per_query_head(v)).transpose(1, 2).reshape(B, T, n_head * head_dim)
    return F.linear(y, o_weight), (k, v)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_kv_head`` key/value heads shared by groups of query heads, RoPE on
    the queries and keys, no biases. ``forward(x, past=None) -> (y, (keys, values))``: the cache holds the
    ``n_kv_head`` rotated key heads (that is what grouped-query attention saves)."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, rope_base: float = 10000.0,
                 rope: str = "interleaved"):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.rope_base = rope_base
        self.rope = rope
        self.q_proj = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)

    def forward(self, x: torch.Tensor, past=None):
        return attention_reference(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.o_proj.weight,
                                   self.n_head, self.n_kv_head, self.rope_base, past, rope=self.rope)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with RMSNorm and SwiGLU."""

    def __init__(self, config: LlamaConfig, rope: str = "interleaved"):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = GroupedQueryAttention(config.n_embd, config.n_head, config.n_kv_head, config.rope_base, rope)
        self.post_attention_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.d_hidden)

    def forward(self, x: torch.Tensor, past=None):
        y, present = self.self_attn(self.input_layernorm(x), past)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Llama(nn.Module):
    """Token embedding, ``n_layer`` ``LlamaBlock``s, a final RMSNorm and an untied output head.

    ``model(idx, past=None) -> (logits, presents)``: ``presents[l]`` is layer ``l``'s ``(keys, values)``;
    passed back as ``past`` with the next tokens, they make the call equal to the matching slice of a
    run on the whole sequence. ``rope="rotate-half"`` pairs features ``i`` and ``i + d/2`` instead of
    neighbours (Hugging Face's layout: load its weights with ``load_llama_weights(..., rope="rotate-half")``).
    """

    def __init__(self, config: LlamaConfig, rope: str = "interleaved"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(config, rope) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, past: list | None = None):
        x = self.embed_tokens(idx)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, None if past is None else past[i])
            presents.append(present)
        return self.lm_head(self.norm(x)), presents

    @classmethod
    def from_hf(cls, hf_model) -> "Llama":
        """A ``Llama`` holding the weights of a ``transformers`` ``LlamaForCausalLM`` (same logits)."""
        hf = hf_model.config
        config = LlamaConfig(vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                             n_kv_head=hf.num_key_value_heads, n_embd=hf.hidden_size, d_hidden=hf.intermediate_size,
                             rope_base=hf.rope_parameters["rope_theta"], norm_eps=hf.rms_norm_eps)
        return load_llama_weights(cls(config), hf_model)


# ---------------------------------------------------------------------------
# Tools for the tests
# ---------------------------------------------------------------------------

# What would do the Llama exercise's work, switched off while the tests run the student's model:
# transformers (its Llama classes, apply_rotary_pos_emb, repeat_kv), the reference model above and the
# course's reference pieces, the helpers of Phases 1 and 8 (Phase 8's grouped_query_attention), and
# PyTorch's fused attention (its enable_gqa=True would do the grouping).
LLAMA_SHORTCUTS = _own_functions("transformers.*", "utils.attention.*", "utils.inference.*", Llama, LlamaBlock,
                                 GroupedQueryAttention, SwiGLU, attention_reference, rope_rotate_half, apply_rope,
                                 RMSNorm, "torch.nn.functional.scaled_dot_product_attention")
LLAMA_OPS = ("scaled_dot_product",)
LLAMA_MESSAGE = ("transformers, the course's reference Llama and its pieces (tx.apply_rope, tx.RMSNorm) and "
                 "F.scaled_dot_product_attention (whose enable_gqa=True would do the grouping for you) are switched "
                 "off while this test runs: write the grouped attention yourself")


def shortcuts_off(*extra):
    """``checks.shortcuts_off`` with what would do the Llama exercise's work (``LLAMA_SHORTCUTS``, ``LLAMA_OPS``)."""
    # What the first dispatch mode imports, imported here and not inside the watched block (where an import
    # would run transformers' import hooks, if transformers is loaded).
    import torch._dynamo  # noqa: F401

    return checks.shortcuts_off(*LLAMA_SHORTCUTS, *extra, ops=LLAMA_OPS, message=LLAMA_MESSAGE)
