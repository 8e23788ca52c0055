"""Phase 8 helpers (efficient inference): KV-cache memory, grouped-query attention, a paged KV cache,
speculative decoding and distillation, the reference versions and the experiments of ``inference.ipynb``.

As in ``utils.quantization``, the reference versions of the graded exercises live here so that the
demonstrations work before an exercise is finished; the hidden tests compare your code with them and
switch them off while your code runs.

* KV-cache memory: ``kv_cache_bytes``, ``KNOWN_MODELS``, ``kv_cache_table``
* attention: ``grouped_query_attention``
* paging (vLLM): ``PagedKVCache``, ``paged_attention``, ``fragmentation``, ``fragmentation_figure``
* speculative decoding: ``verify_draft``, ``expected_tokens_per_step``, ``acceptance_rate``,
  ``speculative_generate``, ``autoregressive_generate`` (both with or without KV caches), ``crop_cache``,
  ``expected_speedup``, ``speculative_comparison`` (the measured wall-clock speed-up)
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
def _next_probs(model: nn.Module, idx: torch.Tensor, temperature: float, cache=None) -> torch.Tensor:
    """The next-token distributions after the positions of ``idx`` (1, L) that the model reads.

    Without a cache: one pass over the last ``block_size`` tokens, a row for each of them. With a
    ``KVCache`` (Phase 2's): only the tokens the cache does not hold yet, ``idx[:, cache.length:]``,
    go through the model (their keys and values are added), a row for each of them."""
    if cache is None:
        logits, _ = model(idx[:, -model.config.block_size:])
    else:
        logits, _ = model(idx[:, cache.length:], cache=cache)
    return F.softmax(logits[0].float() / temperature, dim=-1)      # (T, vocab)


def crop_cache(cache, length: int) -> None:
    """Forget the cached keys and values beyond the first ``length`` positions (rejected drafts)."""
    for i, kv in enumerate(cache.layers):
        if kv is not None and kv[0].shape[2] > length:
            cache.layers[i] = (kv[0][:, :, :length], kv[1][:, :, :length])


def _new_cache(model: nn.Module, prompt: torch.Tensor, n_new: int):
    from .transformer import KVCache

    if prompt.shape[1] + n_new > model.config.block_size:
        raise ValueError(f"{prompt.shape[1]} + {n_new} tokens exceed block_size={model.config.block_size}: "
                         "with a KV cache the whole sequence must fit the model's positions")
    return KVCache(model.config.n_layer)


def _elapsed(start: float, result: torch.Tensor) -> float:
    """Seconds since ``start`` once ``result`` is computed (a GPU runs asynchronously: wait for it)."""
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start


@dataclass
class GenerationStats:
    tokens: list = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0
    accepted_per_step: list = field(default_factory=list)
    alphas: list = field(default_factory=list)
    seconds: float = 0.0           # the whole loop
    target_seconds: float = 0.0    # inside the target's forward passes
    draft_seconds: float = 0.0     # inside the draft's forward passes


@torch.no_grad()
def autoregressive_generate(model: nn.Module, prompt: torch.Tensor, n_new: int, temperature: float = 1.0,
                            seed: int = 0, use_cache: bool = False) -> GenerationStats:
    """Plain sampling, one target call per token. ``use_cache``: Phase 2's KV cache, so that each call
    after the prompt feeds one token (the prompt and the ``n_new`` tokens must fit ``block_size``)."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    idx, stats = prompt.clone(), GenerationStats()
    cache = _new_cache(model, prompt, n_new) if use_cache else None
    start = time.perf_counter()
    while len(stats.tokens) < n_new:
        t0 = time.perf_counter()
        probs = _next_probs(model, idx, temperature, cache)[-1]
        stats.target_seconds += _elapsed(t0, probs)
        token = torch.multinomial(probs, 1, generator=g)
        idx = torch.cat([idx, token[None]], dim=1)
        stats.tokens.append(int(token))
        stats.target_calls += 1
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt: torch.Tensor, n_new: int, gamma: int = 4,
                         temperature: float = 1.0, seed: int = 0, verify: Callable = verify_draft,
                         use_cache: bool = False) -> GenerationStats:
    """Speculative sampling: the draft proposes ``gamma`` tokens one by one, the target scores all of
    them in ONE forward pass, ``verify`` keeps a prefix and adds one token. Records the calls, the
    accepted drafts per step, the per-position acceptance rates alpha and the time in each model.

    ``use_cache``: both models keep a KV cache (Phase 2's); after each verification the caches forget
    the rejected drafts (``crop_cache``). The sequence must then fit ``block_size``, and near its end
    fewer than ``gamma`` tokens are drafted so that the target's pass still fits."""
    g = torch.Generator(device=prompt.device).manual_seed(seed)
    idx, stats = prompt.clone(), GenerationStats()
    t_cache = d_cache = None
    if use_cache:
        t_cache, d_cache = _new_cache(target, prompt, n_new), _new_cache(draft, prompt, n_new)
    limit = min(target.config.block_size, draft.config.block_size)
    start = time.perf_counter()
    while len(stats.tokens) < n_new:
        n_draft = min(gamma, limit - idx.shape[1]) if use_cache else gamma
        draft_idx, q_rows, drafted = idx, [], []
        for _ in range(n_draft):
            t0 = time.perf_counter()
            q = _next_probs(draft, draft_idx, temperature, d_cache)[-1]
            stats.draft_seconds += _elapsed(t0, q)
            token = torch.multinomial(q, 1, generator=g)
            q_rows.append(q)
            drafted.append(int(token))
            draft_idx = torch.cat([draft_idx, token[None]], dim=1)
            stats.draft_calls += 1
        t0 = time.perf_counter()
        p_rows = _next_probs(target, draft_idx, temperature, t_cache)[-(n_draft + 1):]
        stats.target_seconds += _elapsed(t0, p_rows)
        stats.target_calls += 1
        q_probs = torch.stack(q_rows)
        new = verify(drafted, q_probs.cpu(), p_rows.cpu(), g if prompt.device.type == "cpu" else None)
        stats.accepted_per_step.append(len(new) - 1)
        stats.alphas.extend(acceptance_rate(p_rows[:n_draft], q_probs).tolist())
        stats.tokens.extend(int(t) for t in new)
        idx = torch.cat([idx, torch.tensor([new], device=idx.device)], dim=1)
        if use_cache:
            # every position but the newest token is valid in a cache: the target saw all the drafts,
            # the draft all but the last one (fed at the next step when it was accepted)
            crop_cache(t_cache, idx.shape[1] - 1)
            crop_cache(d_cache, idx.shape[1] - 1)
    stats.tokens = stats.tokens[:n_new]
    stats.seconds = time.perf_counter() - start
    return stats


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al. (2023, theorem 3.8): the expected wall-time improvement factor
    (1 - alpha**(gamma + 1)) / ((1 - alpha) (gamma c + 1)), with ``c`` the time of one draft pass divided
    by the time of one target pass (it assumes the target's pass over gamma + 1 tokens costs one pass)."""
    return expected_tokens_per_step(alpha, gamma) / (gamma * c + 1)


def speculative_comparison(target: nn.Module, draft: nn.Module, prompt: torch.Tensor,
                           gammas: Sequence[int] = (1, 2, 4, 6), n_sequences: int = 8, n_new: int | None = None,
                           temperature: float = 1.0, use_cache: bool = True) -> dict:
    """Wall-clock speculative decoding against plain decoding of the target, the same number of tokens.

    ``n_sequences`` continuations of ``prompt`` (seeds 0, 1, ...), each ``n_new`` tokens long (with the
    cache: by default as many as ``block_size`` allows). For every seed the plain loop and the
    speculative loop for every gamma run one after the other, so that a change in the machine's load
    touches all of them alike; on a CPU everything runs on one thread (a second one only adds waiting
    for these tiny matrices). Returns ``{"plain": {...}, "rows": [...]}``: per gamma the measured
    acceptance rate alpha, tokens per target call (measured, and the formula's for that alpha), the cost
    ratio c = (time of a draft pass) / (time of a plain target pass), the target's pass over gamma + 1
    tokens relative to its pass over one, the speed-up predicted by Leviathan et al. for the measured
    alpha and c, the measured speed-up, and the share of the time spent outside the two models
    (sampling, verification, bookkeeping in Python)."""
    from .transformer import one_thread_on_cpu

    if n_new is None:
        n_new = min(target.config.block_size, draft.config.block_size) - prompt.shape[1]
    with one_thread_on_cpu(prompt.device):
        autoregressive_generate(target, prompt, 4, temperature, use_cache=use_cache)          # warm-up
        speculative_generate(target, draft, prompt, 4, 2, temperature, use_cache=use_cache)
        plain, runs = [], {gamma: [] for gamma in gammas}
        for seed in range(n_sequences):
            plain.append(autoregressive_generate(target, prompt, n_new, temperature, seed, use_cache))
            for gamma in gammas:
                runs[gamma].append(speculative_generate(target, draft, prompt, n_new, gamma, temperature, seed,
                                                        use_cache=use_cache))
    plain_seconds = sum(r.seconds for r in plain)
    target_pass = sum(r.target_seconds for r in plain) / sum(r.target_calls for r in plain)
    rows = []
    for gamma in gammas:
        rs = runs[gamma]
        alphas = [a for r in rs for a in r.alphas]
        alpha = sum(alphas) / len(alphas)
        c = sum(r.draft_seconds for r in rs) / sum(r.draft_calls for r in rs) / target_pass
        wide = sum(r.target_seconds for r in rs) / sum(r.target_calls for r in rs) / target_pass
        seconds = sum(r.seconds for r in rs)
        rows.append({"gamma": gamma, "alpha": round(alpha, 3),
                     "tokens per target call (formula)": round(expected_tokens_per_step(alpha, gamma), 2),
                     "tokens per target call (measured)": round(n_new * len(rs) / sum(r.target_calls for r in rs), 2),
                     "c (draft pass / target pass)": round(c, 3),
                     "target pass over gamma+1 tokens / over 1": round(wide, 2),
                     "speed-up predicted (Leviathan et al.)": round(expected_speedup(alpha, gamma, c), 2),
                     "speed-up measured": round(plain_seconds / seconds, 2),
                     "time outside the models": f"{1 - sum(r.target_seconds + r.draft_seconds for r in rs) / seconds:.0%}",
                     "seconds": round(seconds, 2)})
    return {"plain": {"tokens": n_new * n_sequences, "seconds": round(plain_seconds, 2),
                      "ms per target pass": round(1000 * target_pass, 3)},
            "rows": rows, "runs": runs, "n_new": n_new}


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
