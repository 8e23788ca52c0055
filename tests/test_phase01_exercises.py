"""Mutation tests of Phase 1's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
and (with tests/test_exercises_every_phase.py) the untouched stub earns nothing."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/01_attention/attention.ipynb")


def mutate(exercise: str, old: str, new: str) -> str:
    return NB.mutate(exercise, (old, new))


def test_phase_has_the_five_exercises_in_order():
    assert NB.exercises() == ["ex1", "ex2", "ex3", "ex4", "ex5"]


# ---------------------------------------------------------------------------------------------
# Exercise 1: additive attention
# ---------------------------------------------------------------------------------------------

EX1_HEADER = '''
class AdditiveAttention(nn.Module):
    def __init__(self, d_query, d_key, d_attn):
        super().__init__()
        self.W_q = nn.Linear(d_query, d_attn, bias=False)
        self.W_k = nn.Linear(d_key, d_attn, bias=False)
        self.v = nn.Linear(d_attn, 1, bias=False)

    def forward(self, query, keys, mask=None):
'''

EX1_CORRECT = {
    "bmm, torch.where and a large finite negative": EX1_HEADER + '''
        projected = self.W_k(keys) + self.W_q(query)[:, None, :]
        scores = (torch.tanh(projected) @ self.v.weight.T)[..., 0]
        if mask is not None:
            scores = torch.where(mask, scores, torch.full_like(scores, -1e30))
        weights = F.softmax(scores, dim=1)
        context = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return context, weights
''',
    "functional layers and an explicit normalisation": EX1_HEADER + '''
        hidden = torch.tanh(F.linear(query, self.W_q.weight).unsqueeze(-2) + F.linear(keys, self.W_k.weight))
        scores = F.linear(hidden, self.v.weight).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(mask.logical_not(), -float("inf"))
        scores = scores - scores.max(dim=-1, keepdim=True).values
        weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        return (weights.unsqueeze(-1) * keys).sum(dim=1), weights
''',
}

EX1_WRONG = {
    "softmax over the batch axis": ("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=0)", "wrong axis"),
    "mask ignored": ("scores = scores.masked_fill(~mask, float(\"-inf\"))", "pass", "must get exactly 0"),
    "mask inverted": ("masked_fill(~mask,", "masked_fill(mask,", "True = keep"),
    "no tanh": ("torch.tanh(self.W_q(query).unsqueeze(1) + self.W_k(keys))",
                "(self.W_q(query).unsqueeze(1) + self.W_k(keys))", "tanh left out"),
    "mean of the keys": ('torch.einsum("bt,btd->bd", weights, keys)', "keys.mean(1)", "plain mean"),
    "pair returned in the wrong order": ("return context, weights", "return weights, context", "weights has shape"),
    "mask applied after the softmax": (
        "        if mask is not None:\n            scores = scores.masked_fill(~mask, float(\"-inf\"))\n"
        "        weights = torch.softmax(scores, dim=-1)\n",
        "        weights = torch.softmax(scores, dim=-1)\n        if mask is not None:\n"
        "            weights = weights * mask\n", "sum to 1"),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    old, new, message = EX1_WRONG[name]
    outcome = NB.run("ex1", mutate("ex1", old, new))
    assert outcome.lost_points
    assert message in outcome.messages


# ---------------------------------------------------------------------------------------------
# Exercise 2: stable softmax and scaled dot-product attention
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "logsumexp softmax, einsum and torch.where": '''
def stable_softmax(x, dim=-1):
    probs = torch.exp(x - torch.logsumexp(x, dim=dim, keepdim=True))
    return torch.nan_to_num(probs, nan=0.0)


def scaled_dot_product_attention(q, k, v, mask=None):
    scores = torch.einsum("...qd,...kd->...qk", q * q.shape[-1] ** -0.5, k)
    if mask is not None and mask.dtype == torch.bool:
        scores = torch.where(mask, scores, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    weights = stable_softmax(scores)
    return torch.einsum("...qk,...kv->...qv", weights, v), weights
''',
    "softmax on the last axis after movedim, matmul with an explicit transpose": '''
def stable_softmax(x, dim=-1):
    moved = x.movedim(dim, -1)
    top = moved.max(dim=-1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exps = (moved - top).exp()
    sums = exps.sum(dim=-1, keepdim=True)
    probs = torch.where(sums > 0, exps / torch.where(sums > 0, sums, torch.ones_like(sums)), torch.zeros_like(exps))
    return probs.movedim(-1, dim)


def scaled_dot_product_attention(q, k, v, mask=None):
    scale = 1.0 / math.sqrt(k.size(-1))
    scores = torch.matmul(q, torch.transpose(k, -1, -2)) * scale
    if mask is not None:
        if mask.dtype is torch.bool:
            scores = scores.masked_fill(mask == False, -math.inf)  # noqa: E712
        else:
            scores = scores + mask.to(scores.dtype)
    weights = stable_softmax(scores, -1)
    return torch.matmul(weights, v), weights
''',
}

NO_MAX_SOFTMAX = '''
def stable_softmax(x, dim=-1):
    exps = torch.exp(x)
    return exps / exps.sum(dim=dim, keepdim=True)
'''

EX2_WRONG = {
    "no 1/sqrt(d) scaling": (("/ math.sqrt(d)", ""), "no 1/sqrt(d) scaling"),
    "scaling by d": (("/ math.sqrt(d)", "/ d"), "1/d instead of 1/sqrt(d)"),
    "softmax over the query axis": (("stable_softmax(scores, dim=-1)", "stable_softmax(scores, dim=-2)"), "wrong axis"),
    "opposite mask convention": (("masked_fill(~mask,", "masked_fill(mask,"), "opposite convention"),
    "float mask ignored": (("scores = scores + mask", "pass"), "float"),
    "weights returned before masking": (
        ("    if mask is not None:\n        if mask.dtype",
         "    raw_weights = stable_softmax(scores, dim=-1)\n    if mask is not None:\n        if mask.dtype"),
        None),
    "mask applied after the softmax": (
        ("    weights = stable_softmax(scores, dim=-1)\n",
         "    weights = stable_softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)\n"
         "    if mask is not None and mask.dtype == torch.bool:\n        weights = weights * mask\n"),
        "after the softmax"),
    "NaN on fully masked rows": (('    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)\n', ""),
                                 "fully masked row"),
    "built-in softmax": (("    exps = torch.exp(x - row_max)\n", "    return torch.softmax(x, dim=dim)\n"),
                         "switched off"),
}


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex2", EX2_CORRECT[name])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    (old, new), message = EX2_WRONG[name]
    source = mutate("ex2", old, new)
    if name == "weights returned before masking":
        source = mutate("ex2", "    return weights @ v, weights", "    return weights @ v, raw_weights")
        source = source.replace(old, new)
    outcome = NB.run("ex2", source)
    assert outcome.lost_points
    if message:
        assert message in outcome.messages


def test_ex2_missing_scale_loses_every_point():
    """The grading round trip relies on it: every ex2 test cell compares with PyTorch."""
    outcome = NB.run("ex2", mutate("ex2", "/ math.sqrt(d)", ""))
    assert sum(outcome.earned.values()) == 0, outcome.earned


def test_ex2_softmax_without_max_subtraction_fails_on_large_scores():
    source = NB.solution_source("ex2")
    start, end = source.index("def stable_softmax"), source.index("def scaled_dot_product_attention")
    outcome = NB.run("ex2", source[:start] + NO_MAX_SOFTMAX.strip() + "\n\n\n" + source[end:])
    assert outcome.earned["ex2_test_stability"] == 0
    assert "Subtract the maximum" in outcome.errors["ex2_test_attention"]


def test_ex2_calling_the_builtin_attention_fails():
    source = mutate("ex2", "    return weights @ v, weights",
                    "    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), weights")
    outcome = NB.run("ex2", source)
    assert sum(outcome.earned.values()) == 0
    assert "switched off" in outcome.messages


# ---------------------------------------------------------------------------------------------
# Exercise 3: masks
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "index comparisons": '''
def causal_mask(t_q, t_k=None):
    t_k = t_k or t_q
    return torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)


def padding_mask(lengths, t):
    return torch.arange(t).expand(len(lengths), t) < lengths.unsqueeze(1)


def attention_mask(lengths, t_q, t_k=None, causal=True):
    t_k = t_k or t_q
    keys = padding_mask(lengths, t_k).view(-1, 1, 1, t_k).repeat(1, 1, t_q, 1)
    return keys & causal_mask(t_q, t_k) if causal else keys
''',
    "Python loops": '''
def causal_mask(t_q, t_k=None):
    if t_k is None:
        t_k = t_q
    offset = t_k - t_q
    return torch.tensor([[j <= i + offset for j in range(t_k)] for i in range(t_q)], dtype=torch.bool)


def padding_mask(lengths, t):
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        mask[b, :n] = True
    return mask


def attention_mask(lengths, t_q, t_k=None, causal=True):
    if t_k is None:
        t_k = t_q
    base = causal_mask(t_q, t_k) if causal else torch.ones(t_q, t_k, dtype=torch.bool)
    return torch.stack([base & row for row in padding_mask(lengths, t_k)]).unsqueeze(1)
''',
}

EX3_WRONG = {
    "diagonal excluded": (("tril(diagonal=t_k - t_q)", "tril(diagonal=t_k - t_q - 1)"), "diagonal excluded"),
    "upper triangle": (("tril(diagonal=t_k - t_q)", "triu(diagonal=t_q - t_k)"), "upper triangle"),
    "top-left alignment": (("tril(diagonal=t_k - t_q)", "tril()"), "top-left"),
    "padding inverted": (("< lengths[:, None]", ">= lengths[:, None]"), "True on the padding"),
    "padding off by one": (("< lengths[:, None]", "<= lengths[:, None]"), "one position too many"),
    "combined with or": (("mask = mask & causal_mask", "mask = mask | causal_mask"), "`or` instead of `and`"),
    "combined mask not expanded over queries": ((".expand(-1, 1, t_q, t_k)", ""), "causal=False"),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    (old, new), message = EX3_WRONG[name]
    outcome = NB.run("ex3", mutate("ex3", old, new))
    assert outcome.lost_points
    assert message in outcome.messages


# ---------------------------------------------------------------------------------------------
# Exercise 4: multi-head attention
# ---------------------------------------------------------------------------------------------

EX4_HEADER = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query, key, value, attn_mask=None):
'''

EX4_CORRECT = {
    "view and transpose, attention by hand": EX4_HEADER + '''
        b, t_q, d_model = query.shape
        d_head = d_model // self.n_heads

        def split(x):
            return x.view(b, x.shape[1], self.n_heads, d_head).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        scores = q @ k.transpose(-1, -2) / d_head ** 0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        heads = scores.softmax(-1) @ v
        return self.out_proj(heads.transpose(1, 2).reshape(b, t_q, d_model))
''',
    "einops with explicit head size": EX4_HEADER + '''
        d_head = query.shape[-1] // self.n_heads
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", d=d_head)
                   for proj, x in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        merged = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), "b h t d -> b t (h d)")
        return self.out_proj(merged)
''',
}

EX4_WRONG = {
    "heads split as (d h)": ((
        'q = rearrange(self.q_proj(query), "b t (h d) -> b h t d", h=self.n_heads)\n'
        '        k = rearrange(self.k_proj(key), "b t (h d) -> b h t d", h=self.n_heads)\n'
        '        v = rearrange(self.v_proj(value), "b t (h d) -> b h t d", h=self.n_heads)',
        'q = rearrange(self.q_proj(query), "b t (d h) -> b h t d", h=self.n_heads)\n'
        '        k = rearrange(self.k_proj(key), "b t (d h) -> b h t d", h=self.n_heads)\n'
        '        v = rearrange(self.v_proj(value), "b t (d h) -> b h t d", h=self.n_heads)'), "split or merged"),
    "heads merged in the wrong order": (('"b h t d -> b t (h d)"', '"b h t d -> b t (d h)"'), "split or merged"),
    "reshape without transpose": ((
        '        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)\n'
        '        return self.out_proj(rearrange(heads, "b h t d -> b t (h d)"))',
        '        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)\n'
        '        return self.out_proj(heads.reshape(query.shape))'), "split or merged"),
    "out_proj missing": (('return self.out_proj(rearrange(heads, "b h t d -> b t (h d)"))',
                          'return rearrange(heads, "b h t d -> b t (h d)")'), "out_proj"),
    "mask ignored": (("attn_mask=attn_mask)", "attn_mask=None)"), "mask ignored"),
    "keys projected with the query layer": (("self.k_proj(key)", "self.q_proj(key)"), "does not match"),
}


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex4", EX4_CORRECT[name])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    (old, new), message = EX4_WRONG[name]
    outcome = NB.run("ex4", mutate("ex4", old, new))
    assert outcome.lost_points
    assert message in outcome.messages


# ---------------------------------------------------------------------------------------------
# Exercise 5: tiled attention
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "online softmax with in-place updates and einsum": '''
def tiled_attention(q, k, v, block_size):
    d = q.shape[-1]
    m = q.new_full((*q.shape[:-1], 1), float("-inf"))
    l = q.new_zeros((*q.shape[:-1], 1))
    o = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    t_k = k.shape[-2]
    start = 0
    while start < t_k:
        stop = min(start + block_size, t_k)
        s = torch.einsum("...qd,...kd->...qk", q, k[..., start:stop, :]) / math.sqrt(d)
        m_new = torch.max(m, s.max(dim=-1, keepdim=True).values)
        alpha = (m - m_new).exp()
        p = (s - m_new).exp()
        l.mul_(alpha).add_(p.sum(-1, keepdim=True))
        o.mul_(alpha).add_(torch.einsum("...qk,...kv->...qv", p, v[..., start:stop, :]))
        m = m_new
        start = stop
    return o / l
''',
    "running log-sum-exp with the built-in softmax of each block": '''
def tiled_attention(q, k, v, block_size):
    out, lse = None, None
    for k_block, v_block in zip(k.split(block_size, dim=-2), v.split(block_size, dim=-2)):
        scores = q @ k_block.mT / math.sqrt(q.shape[-1])
        block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        block_out = torch.softmax(scores, dim=-1) @ v_block
        if out is None:
            out, lse = block_out, block_lse
        else:
            new_lse = torch.logaddexp(lse, block_lse)
            out = out * torch.exp(lse - new_lse) + block_out * torch.exp(block_lse - new_lse)
            lse = new_lse
    return out
''',
}

TWO_PASS = '''
def tiled_attention(q, k, v, block_size):
    scale = q.shape[-1] ** -0.5
    blocks = list(zip(k.split(block_size, dim=-2), v.split(block_size, dim=-2)))
    row_max = torch.full(q.shape[:-1] + (1,), -float("inf"), dtype=q.dtype)
    for k_block, _ in blocks:
        row_max = torch.maximum(row_max, (q @ k_block.transpose(-1, -2) * scale).amax(-1, keepdim=True))
    total = torch.zeros_like(row_max)
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    for k_block, v_block in blocks:
        p = torch.exp(q @ k_block.transpose(-1, -2) * scale - row_max)
        total = total + p.sum(-1, keepdim=True)
        out = out + p @ v_block
    return out / total
'''

EX5_WRONG = {
    "accumulator not rescaled": (("accumulator = accumulator * correction + exps @ v_block",
                                  "accumulator = accumulator + exps @ v_block"), "multiplied by exp(m - m_new)"),
    "denominator not rescaled": (("denominator = denominator * correction + exps.sum",
                                  "denominator = denominator + exps.sum"), "multiplied by exp(m - m_new)"),
    "only the first block": (("        running_max = new_max\n", "        running_max = new_max\n        break\n"),
                             "first block of keys"),
    "no running maximum (overflow)": (("torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))",
                                       "torch.zeros_like(running_max)"), None),
}

FULL_ATTENTION_IN_BLOCKS = '''
def tiled_attention(q, k, v, block_size):
    scores = torch.cat([q @ kb.transpose(-2, -1) for kb in k.split(block_size, dim=-2)], dim=-1) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores, dim=-1)
    return weights @ v
'''


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message = EX5_WRONG[name]
    outcome = NB.run("ex5", mutate("ex5", old, new))
    assert outcome.earned["ex5_test_exact"] == 0
    if message:
        assert message in outcome.messages


def test_ex5_materialising_the_scores_earns_nothing():
    """Exact, but not tiled: every test cell watches how the keys are read."""
    outcome = NB.run("ex5", FULL_ATTENTION_IN_BLOCKS)
    assert sum(outcome.earned.values()) == 0, outcome.earned
    assert "(1, 256, 256)" in outcome.errors["ex5_test_memory"]


def test_ex5_two_passes_over_the_blocks_earn_nothing():
    """Exact and tiled, but the maximum comes from a first pass: every key is scored twice."""
    outcome = NB.run("ex5", TWO_PASS)
    assert sum(outcome.earned.values()) == 0, outcome.earned
    assert "two-pass softmax" in outcome.messages


def test_ex5_calling_the_builtin_fails():
    outcome = NB.run("ex5", "def tiled_attention(q, k, v, block_size):\n"
                            "    return F.scaled_dot_product_attention(q, k, v)\n")
    assert sum(outcome.earned.values()) == 0
    assert "switched off" in outcome.messages


# ---------------------------------------------------------------------------------------------
# Shortcuts: a library call, PyTorch's own version or the course's helper instead of the idea.
# Each row must earn nothing on every test cell of its exercise (tests/test_shortcuts_every_phase.py).
# ---------------------------------------------------------------------------------------------

SHORTCUTS = {
    "ex1": {
        "PyTorch's attention does the softmax and the weighted sum (additive scores as a float mask)": EX1_HEADER + '''
        scores = self.v(torch.tanh(self.W_q(query).unsqueeze(1) + self.W_k(keys))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        silent = keys.new_zeros(keys.shape[0], 1, keys.shape[-1])  # q.k = 0: the mask alone sets the scores
        context = F.scaled_dot_product_attention(silent, keys, keys, attn_mask=scores[:, None, :]).squeeze(1)
        weights = attn_utils.reference_weights(silent, keys, scores[:, None, :]).squeeze(1)
        return context, weights
''',
    },
    "ex2": {
        "the built-in softmax and F.scaled_dot_product_attention": '''
def stable_softmax(x, dim=-1):
    return torch.nan_to_num(torch.softmax(x, dim=dim))


def scaled_dot_product_attention(q, k, v, mask=None):
    weights = torch.nan_to_num(attn_utils.reference_weights(q, k, mask))
    return torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), weights
''',
        "log_softmax, exponentiated": '''
def stable_softmax(x, dim=-1):
    return torch.nan_to_num(F.log_softmax(x, dim=dim).exp())


def scaled_dot_product_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = stable_softmax(scores)
    return weights @ v, weights
''',
    },
    "ex3": {
        "PyTorch's causal_lower_right bias, materialised": '''
from torch.nn.attention.bias import causal_lower_right


def causal_mask(t_q, t_k=None):
    return causal_lower_right(t_q, t_q if t_k is None else t_k)._materialize()


def padding_mask(lengths, t):
    rows = torch.cat([torch.zeros(1, t, dtype=torch.bool), causal_lower_right(t, t)._materialize()])
    return rows[lengths.long()]  # row n of a causal mask has exactly n leading True


def attention_mask(lengths, t_q, t_k=None, causal=True):
    t_k = t_q if t_k is None else t_k
    mask = padding_mask(lengths, t_k)[:, None, None, :].expand(-1, 1, t_q, t_k)
    return mask & causal_mask(t_q, t_k) if causal else mask
''',
        "nn.Transformer's square subsequent mask": '''
def causal_mask(t_q, t_k=None):
    t_k = t_q if t_k is None else t_k
    return nn.Transformer.generate_square_subsequent_mask(t_k)[t_k - t_q:] == 0


def padding_mask(lengths, t):
    rows = torch.cat([torch.zeros(1, t, dtype=torch.bool), nn.Transformer.generate_square_subsequent_mask(t) == 0])
    return rows[lengths.long()]


def attention_mask(lengths, t_q, t_k=None, causal=True):
    t_k = t_q if t_k is None else t_k
    mask = padding_mask(lengths, t_k)[:, None, None, :].expand(-1, 1, t_q, t_k)
    return mask & causal_mask(t_q, t_k) if causal else mask
''',
    },
    "ex4": {
        "F.multi_head_attention_forward with the four layers' weights": EX4_HEADER + '''
        b, t_q, t_k = query.shape[0], query.shape[1], key.shape[1]
        mask = None
        if attn_mask is not None:
            mask = attn_mask.expand(b, self.n_heads, t_q, t_k).reshape(b * self.n_heads, t_q, t_k)
            mask = ~mask if mask.dtype == torch.bool else mask  # PyTorch's boolean masks: True = hidden
        out, _ = F.multi_head_attention_forward(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), query.shape[-1], self.n_heads,
            torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
            torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]), None, None, False, 0.0,
            self.out_proj.weight, self.out_proj.bias, training=False, need_weights=False, attn_mask=mask)
        return out.transpose(0, 1)
''',
        "nn.MultiheadAttention built on the fly with the same weights": EX4_HEADER + '''
        d_model, b, t_q, t_k = query.shape[-1], query.shape[0], query.shape[1], key.shape[1]
        module = nn.MultiheadAttention(d_model, self.n_heads, batch_first=True)
        module.in_proj_weight = nn.Parameter(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        module.in_proj_bias = nn.Parameter(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        module.out_proj = self.out_proj
        mask = None
        if attn_mask is not None:
            mask = attn_mask.expand(b, self.n_heads, t_q, t_k).reshape(b * self.n_heads, t_q, t_k)
            mask = ~mask if mask.dtype == torch.bool else mask
        return module(query, key, value, attn_mask=mask, need_weights=False)[0]
''',
    },
    "ex5": {
        "an exact softmax one query row at a time, no online rescaling": '''
def tiled_attention(q, k, v, block_size):
    rows = []
    for i in range(q.shape[-2]):
        scores = q[..., i:i + 1, :] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        rows.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(rows, dim=-2)
''',
        "F.scaled_dot_product_attention": '''
def tiled_attention(q, k, v, block_size):
    return F.scaled_dot_product_attention(q, k, v)
''',
        "the course's naive attention helper": '''
def tiled_attention(q, k, v, block_size):
    return attn_utils.naive_attention(q, k, v)
''',
    },
}
