"""Phase 8 helpers (efficient inference): KV-cache memory, grouped-query attention, a paged KV cache,
speculative decoding and distillation, the reference versions and the experiments of ``inference.ipynb``.

As in ``utils.quantization``, the reference versions of the graded exercises live here so that the
demonstrations work before an exercise is finished; the hidden tests compare your code with them and
switch them off while your code runs.

* KV-cache memory: ``kv_cache_bytes``, ``KNOWN_MODELS``, ``kv_cache_table``
* attention: ``grouped_query_attention``
* paging (vLLM): ``PagedKVCache``, ``paged_attention``, ``fragmentation``, ``fragmentation_figure``
* speculative decoding: ``verify_draft``, ``expected_tokens_per_step``, ``acceptance_rate``,
  ``speculative_generate``, ``autoregressive_generate``
* distillation: ``distillation_loss``, ``train_student``
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots

# ---------------------------------------------------------------------------
# KV-cache memory
# ---------------------------------------------------------------------------


def kv_cache_bytes(n_layer: int, n_kv_head: int, head_dim: int, seq_len: int, batch: int = 1,
                   bytes_per_value: float = 2) -> float:
    """Bytes of the KV cache: keys and values (2) for every layer, KV head, position and sequence."""
    return 2 * n_layer * n_kv_head * head_dim * seq_len * batch * bytes_per_value


# Published shapes (config files of the released checkpoints).
KNOWN_MODELS = {
    "Llama 2 7B (multi-head)": dict(n_layer=32, n_head=32, n_kv_head=32, head_dim=128, params=6.7e9),
    "Falcon 7B (multi-query)": dict(n_layer=32, n_head=71, n_kv_head=1, head_dim=64, params=7.2e9),
    "Mistral 7B (grouped-query, 8 KV heads)": dict(n_layer=32, n_head=32, n_kv_head=8, head_dim=128, params=7.2e9),
    "Llama 2 70B (grouped-query, 8 KV heads)": dict(n_layer=80, n_head=64, n_kv_head=8, head_dim=128, params=69e9),
}


def kv_cache_table(seq_len: int = 4096, batch: int = 1, bytes_per_value: float = 2) -> list[dict]:
    """KV-cache size of the known models at ``seq_len`` tokens, next to their weights in 16 bits."""
    rows = []
    for name, m in KNOWN_MODELS.items():
        cache = kv_cache_bytes(m["n_layer"], m["n_kv_head"], m["head_dim"], seq_len, batch, bytes_per_value)
        per_token = kv_cache_bytes(m["n_layer"], m["n_kv_head"], m["head_dim"], 1, 1, bytes_per_value)
        rows.append({"model": name, "KV per token": f"{per_token / 1024:.0f} KiB",
                     f"KV cache, {batch} x {seq_len} tokens": f"{cache / 2**30:.2f} GiB",
                     "weights (16-bit)": f"{m['params'] * 2 / 2**30:.1f} GiB"})
    return rows


def table(rows: list[dict]):
    from .quantization import table as html_table

    return html_table(rows)


# ---------------------------------------------------------------------------
# Grouped-query attention
# ---------------------------------------------------------------------------


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with ``q`` (B, Hq, T, d) and ``k``, ``v`` (B, Hkv, T, d), Hq a multiple of Hkv:
    query head h reads KV head ``h // (Hq // Hkv)`` (Ainslie et al. 2023)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------
# Paged KV cache (Kwon et al. 2023)
# ---------------------------------------------------------------------------


class PagedKVCache:
    """Keys and values stored in fixed-size blocks ("pages") of one shared pool; each sequence owns a
    block table, the list of its blocks in order, and blocks are taken only when a sequence needs one."""

    def __init__(self, num_blocks: int, block_size: int, n_head: int, head_dim: int, dtype=torch.float32):
        self.block_size = block_size
        self.k_pages = torch.zeros(num_blocks, block_size, n_head, head_dim, dtype=dtype)
        self.v_pages = torch.zeros(num_blocks, block_size, n_head, head_dim, dtype=dtype)
        self.free_blocks = list(range(num_blocks))
        self.block_tables: dict = {}
        self.lengths: dict = {}

    def append(self, seq_id, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the key and value (n_head, head_dim) of the next token of ``seq_id``."""
        table = self.block_tables.setdefault(seq_id, [])
        length = self.lengths.get(seq_id, 0)
        if length == len(table) * self.block_size:
            if not self.free_blocks:
                raise MemoryError("no free block left")
            table.append(self.free_blocks.pop(0))
        block, offset = table[length // self.block_size], length % self.block_size
        self.k_pages[block, offset] = k
        self.v_pages[block, offset] = v
        self.lengths[seq_id] = length + 1

    def free(self, seq_id) -> None:
        """Give the blocks of a finished sequence back to the pool."""
        self.free_blocks.extend(self.block_tables.pop(seq_id))
        del self.lengths[seq_id]

    def gather(self, seq_id) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``seq_id`` in order, each (length, n_head, head_dim)."""
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.long)
        n = self.lengths[seq_id]
        return (self.k_pages[table].flatten(0, 1)[:n], self.v_pages[table].flatten(0, 1)[:n])


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table, length: int) -> torch.Tensor:
    """One decoding step: query ``q`` (n_head, d) attends to the first ``length`` positions stored in
    the blocks ``block_table`` of the pools ``k_pages``/``v_pages`` (num_blocks, block_size, n_head, d)."""
    table = torch.as_tensor(block_table, dtype=torch.long)
    k = k_pages[table].flatten(0, 1)[:length]          # (length, n_head, d)
    v = v_pages[table].flatten(0, 1)[:length]
    scores = torch.einsum("hd,thd->ht", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("ht,thd->hd", scores.softmax(dim=-1), v)


def fragmentation(n_requests: int = 200, max_len: int = 2048, block_size: int = 16, seed: int = 0) -> dict:
    """Share of reserved KV memory that holds no token, for requests of random lengths (uniform in
    1 .. max_len): contiguous pre-allocation of ``max_len`` slots per request (what systems before
    vLLM did) against pages of ``block_size`` (only the last page of each request is partly empty)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n_requests,), generator=g)
    used = int(lengths.sum())
    contiguous = n_requests * max_len
    paged = int((torch.div(lengths + block_size - 1, block_size, rounding_mode="floor") * block_size).sum())
    return {"tokens": used, "contiguous slots": contiguous, "paged slots": paged,
            "contiguous waste": 1 - used / contiguous, "paged waste": 1 - used / paged}


def fragmentation_figure(block_sizes: Sequence[int] = (1, 4, 8, 16, 32, 64, 128, 256), **kwargs):
    waste = [100 * fragmentation(block_size=b, **kwargs)["paged waste"] for b in block_sizes]
    contiguous = 100 * fragmentation(block_size=16, **kwargs)["contiguous waste"]
    return plots.line_chart(list(block_sizes), {"paged": waste, "contiguous pre-allocation": [contiguous] * len(block_sizes)},
                            title="Reserved KV-cache memory holding no token", xaxis_title="block size (tokens)",
                            yaxis_title="wasted share (%)", log_x=True, height=340)


# ---------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023; Chen et al. 2023)
# ---------------------------------------------------------------------------


def verify_draft(draft_tokens, q_probs: torch.Tensor, p_probs: torch.Tensor,
                 generator: torch.Generator | None = None) -> list[int]:
    """Accept each drafted token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection sample from the residual max(0, p_i - q_i) (normalised) and stop; if every draft is
    accepted, sample one more token from p_gamma. The result is distributed as sampling from p."""
    out = []
    for i, token in enumerate(list(draft_tokens)):
        token = int(token)
        p, q = float(p_probs[i, token]), float(q_probs[i, token])
        if float(torch.rand((), generator=generator)) * q < p:      # u < p/q, without dividing by 0
            out.append(token)
            continue
        residual = (p_probs[i] - q_probs[i]).clamp(min=0)
        residual = residual / residual.sum() if float(residual.sum()) > 0 else p_probs[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p_probs[len(out)], 1, generator=generator)))
    return out


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """Tokens produced per target call: (1 - alpha**(gamma + 1)) / (1 - alpha) (Leviathan et al., eq. 1)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """alpha = E_{x~q}[min(1, p(x)/q(x))] = sum_x min(p(x), q(x)) = 1 - total variation distance."""
    return torch.minimum(p, q).sum(-1)


@torch.no_grad()
def _next_probs(model: nn.Module, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    logits, _ = model(idx[:, -model.config.block_size:])
    return F.softmax(logits[0].float() / temperature, dim=-1)      # (T, vocab)


@dataclass
class GenerationStats:
    tokens: list = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0
    accepted_per_step: list = field(default_factory=list)
    alphas: list = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def autoregressive_generate(model: nn.Module, prompt: torch.Tensor, n_new: int, temperature: float = 1.0,
                            seed: int = 0) -> GenerationStats:
    """Plain sampling, one target call per token (no KV cache, like the speculative loop below)."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    idx, stats = prompt.clone(), GenerationStats()
    start = time.perf_counter()
    while len(stats.tokens) < n_new:
        probs = _next_probs(model, idx, temperature)[-1]
        token = torch.multinomial(probs, 1, generator=g)
        idx = torch.cat([idx, token[None]], dim=1)
        stats.tokens.append(int(token))
        stats.target_calls += 1
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt: torch.Tensor, n_new: int, gamma: int = 4,
                         temperature: float = 1.0, seed: int = 0, verify: Callable = verify_draft) -> GenerationStats:
    """Speculative sampling: the draft proposes ``gamma`` tokens one by one, the target scores all of
    them in ONE forward pass, ``verify`` keeps a prefix and adds one token. Records the calls, the
    accepted drafts per step and the per-position acceptance rates alpha."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    idx, stats = prompt.clone(), GenerationStats()
    start = time.perf_counter()
    while len(stats.tokens) < n_new:
        draft_idx, q_rows, drafted = idx, [], []
        for _ in range(gamma):
            q = _next_probs(draft, draft_idx, temperature)[-1]
            token = torch.multinomial(q, 1, generator=g)
            q_rows.append(q)
            drafted.append(int(token))
            draft_idx = torch.cat([draft_idx, token[None]], dim=1)
            stats.draft_calls += 1
        p_rows = _next_probs(target, draft_idx, temperature)[-(gamma + 1):]
        stats.target_calls += 1
        q_probs = torch.stack(q_rows)
        new = verify(drafted, q_probs.cpu(), p_rows.cpu(), g if prompt.device.type == "cpu" else None)
        stats.accepted_per_step.append(len(new) - 1)
        stats.alphas.extend(acceptance_rate(p_rows[:gamma], q_probs).tolist())
        stats.tokens.extend(int(t) for t in new)
        idx = torch.cat([idx, torch.tensor([new], device=idx.device)], dim=1)
    stats.tokens = stats.tokens[:n_new]
    stats.seconds = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------
# Distillation (Hinton, Vinyals & Dean 2015)
# ---------------------------------------------------------------------------


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the rows (all leading dims)."""
    s = student_logits.reshape(-1, student_logits.shape[-1]) / temperature
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True) * temperature ** 2


def train_student(teacher: nn.Module, config, ids: torch.Tensor, steps: int, *, temperature: float = 2.0,
                  soft_weight: float = 1.0, batch_size: int = 16, block: int = 64, lr: float = 3e-3,
                  seed: int = 0, loss_fn: Callable = distillation_loss) -> tuple[nn.Module, list[float]]:
    """Train a GPT of ``config`` on random windows of ``ids``: ``soft_weight`` times the distillation
    loss against ``teacher`` plus ``1 - soft_weight`` times the usual next-token loss (soft_weight=0:
    no teacher at all). Returns the student (eval mode) and its training losses."""
    from .transformer import GPT

    device = next(teacher.parameters()).device
    torch.manual_seed(seed)
    student = GPT(config).to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    teacher.eval()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (batch_size,), generator=g)
        x = torch.stack([ids[s:s + block] for s in starts.tolist()]).to(device)
        y = torch.stack([ids[s + 1:s + block + 1] for s in starts.tolist()]).to(device)
        logits, hard = student(x, y)
        loss = hard
        if soft_weight > 0:
            with torch.no_grad():
                teacher_logits, _ = teacher(x)
            loss = soft_weight * loss_fn(logits, teacher_logits, temperature) + (1 - soft_weight) * hard
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        # a cosine decay makes short runs end lower
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    student.eval()
    return student, losses
