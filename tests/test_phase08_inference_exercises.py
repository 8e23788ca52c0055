"""Mutation tests of Phase 8's inference notebook: correct solutions written in other ways get full
marks, realistic wrong ones lose points, and the shortcuts (PyTorch's fused attention, F.kl_div, the
course's reference versions in utils.inference) earn nothing."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/08_quantization/inference.ipynb")
mutate = NB.mutate
check_correct = NB.assert_full_marks
check_wrong = NB.assert_loses_points


def test_notebook_has_the_five_exercises_in_order():
    assert NB.exercises() == ["ex1", "ex2", "ex3", "ex4", "ex5"]


SHORTCUTS = {
    "ex1": {
        "PyTorch's fused attention with enable_gqa": '''
def grouped_query_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
''',
        "the course's reference": '''
def grouped_query_attention(q, k, v):
    return inference.grouped_query_attention(q, k, v)
''',
    },
    "ex2": {
        "the course's reference cache": '''
class PagedKVCache(inference.PagedKVCache):
    pass
''',
    },
    "ex3": {
        "the course's reference attention": '''
def paged_attention(q, k_pages, v_pages, block_table, length):
    return inference.paged_attention(q, k_pages, v_pages, block_table, length)
''',
    },
    "ex4": {
        "F.kl_div": '''
def distillation_loss(student_logits, teacher_logits, temperature):
    V = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, V) / temperature, -1),
                    F.softmax(teacher_logits.reshape(-1, V) / temperature, -1), reduction="batchmean") * temperature ** 2
''',
        "cross-entropy with soft targets minus the entropy": '''
def distillation_loss(student_logits, teacher_logits, temperature):
    V = student_logits.shape[-1]
    t = F.softmax(teacher_logits.reshape(-1, V) / temperature, -1)
    ce = F.cross_entropy(student_logits.reshape(-1, V) / temperature, t)
    return (ce + (t * t.clamp_min(1e-30).log()).sum(-1).mean()) * temperature ** 2
''',
        "the course's reference": '''
def distillation_loss(student_logits, teacher_logits, temperature):
    return inference.distillation_loss(student_logits, teacher_logits, temperature)
''',
    },
    "ex5": {
        "the course's reference": '''
def verify_draft(draft_tokens, q_probs, p_probs, generator=None):
    return inference.verify_draft(draft_tokens, q_probs, p_probs, generator)
''',
    },
}


# ---------------------------------------------------------------------------------------------
# Exercise 1: grouped-query attention
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "queries grouped and broadcast, no copies of K and V": '''
def grouped_query_attention(q, k, v):
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, T, d)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg, k) * d ** -0.5
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = torch.where(mask, scores, torch.tensor(float("-inf")))
    out = torch.einsum("bhgts,bhsd->bhgtd", torch.softmax(scores, -1), v)
    return out.reshape(B, Hq, T, d)
''',
}

EX1_WRONG = {
    "repeat instead of repeat_interleave": (("k = k.repeat_interleave(group, dim=1)\n    v = v.repeat_interleave(group, dim=1)",
                                             "k = k.repeat(1, group, 1, 1)\n    v = v.repeat(1, group, 1, 1)"), "tiled"),
    "no causal mask": (("return scores.masked_fill(future, float(\"-inf\")).softmax(dim=-1) @ v",
                        "return scores.softmax(dim=-1) @ v"), "no causal mask"),
    "no scale": (("scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])", "scores = q @ k.transpose(-2, -1)"), None),
    "mask includes the diagonal": ((".triu(1)", ".triu(0)"), None),
}


def test_ex1_correct_alternative_gets_full_marks():
    check_correct("ex1", EX1_CORRECT["queries grouped and broadcast, no copies of K and V"])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    (old, new), message = EX1_WRONG[name]
    check_wrong("ex1", mutate("ex1", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 2: the paged KV cache
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "divmod and index_select": '''
class PagedKVCache:
    def __init__(self, num_blocks, block_size, n_head, head_dim):
        self.block_size = block_size
        self.k_pages = torch.zeros(num_blocks, block_size, n_head, head_dim)
        self.v_pages = torch.zeros(num_blocks, block_size, n_head, head_dim)
        self.free_blocks = list(range(num_blocks))
        self.block_tables = {}
        self.lengths = {}

    def append(self, seq_id, k, v):
        if seq_id not in self.block_tables:
            self.block_tables[seq_id], self.lengths[seq_id] = [], 0
        block_index, slot = divmod(self.lengths[seq_id], self.block_size)
        if block_index == len(self.block_tables[seq_id]):
            if len(self.free_blocks) == 0:
                raise MemoryError
            self.block_tables[seq_id].append(self.free_blocks.pop(0))
        block = self.block_tables[seq_id][block_index]
        self.k_pages[block, slot].copy_(k)
        self.v_pages[block, slot].copy_(v)
        self.lengths[seq_id] += 1

    def free(self, seq_id):
        for block in self.block_tables[seq_id]:
            self.free_blocks.append(block)
        self.block_tables.pop(seq_id)
        self.lengths.pop(seq_id)

    def gather(self, seq_id):
        idx = torch.tensor(self.block_tables[seq_id], dtype=torch.long)
        n = self.lengths[seq_id]
        k = self.k_pages.index_select(0, idx).reshape(-1, *self.k_pages.shape[2:])
        v = self.v_pages.index_select(0, idx).reshape(-1, *self.v_pages.shape[2:])
        return k[:n], v[:n]
''',
}

EX2_WRONG = {
    "a block for every token": (("        if n == len(table) * self.block_size:", "        if True:"), None),
    "last free block taken": (("table.append(self.free_blocks.pop(0))", "table.append(self.free_blocks.pop())"), None),
    "freed blocks put first": (("self.free_blocks.extend(self.block_tables.pop(seq_id))",
                                "self.free_blocks[:0] = self.block_tables.pop(seq_id)"), "free list"),
    "blocks never freed": (("self.free_blocks.extend(self.block_tables.pop(seq_id))", "self.block_tables.pop(seq_id)"),
                           "free list"),
    "gather returns whole blocks": (("return self.k_pages[table].flatten(0, 1)[:n], self.v_pages[table].flatten(0, 1)[:n]",
                                     "return self.k_pages[table].flatten(0, 1), self.v_pages[table].flatten(0, 1)"), None),
    "no MemoryError": (("                raise MemoryError(\"the KV cache is full\")\n", "                return\n"), None),
}


def test_ex2_correct_alternative_gets_full_marks():
    check_correct("ex2", EX2_CORRECT["divmod and index_select"])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    (old, new), message = EX2_WRONG[name]
    check_wrong("ex2", mutate("ex2", (old, new)), message)


def test_ex2_a_cache_that_keeps_its_own_lists_loses_points():
    source = '''
class PagedKVCache:
    def __init__(self, num_blocks, block_size, n_head, head_dim):
        self.block_size = block_size
        self.k_pages = torch.zeros(num_blocks, block_size, n_head, head_dim)
        self.v_pages = torch.zeros(num_blocks, block_size, n_head, head_dim)
        self.free_blocks = list(range(num_blocks))
        self.block_tables = {}
        self.lengths = {}
        self.plain = {}

    def append(self, seq_id, k, v):
        table = self.block_tables.setdefault(seq_id, [])
        n = self.lengths.get(seq_id, 0)
        if n == len(table) * self.block_size:
            if not self.free_blocks:
                raise MemoryError
            table.append(self.free_blocks.pop(0))
        self.plain.setdefault(seq_id, []).append((k, v))
        self.lengths[seq_id] = n + 1

    def free(self, seq_id):
        self.free_blocks.extend(self.block_tables.pop(seq_id))
        del self.lengths[seq_id]
        del self.plain[seq_id]

    def gather(self, seq_id):
        return (torch.stack([k for k, _ in self.plain[seq_id]]), torch.stack([v for _, v in self.plain[seq_id]]))
'''
    check_wrong("ex2", source, "k_pages", cell="ex2_test_paging")


# ---------------------------------------------------------------------------------------------
# Exercise 3: paged attention
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "gather, then PyTorch's fused attention": '''
def paged_attention(q, k_pages, v_pages, block_table, length):
    idx = torch.tensor(list(block_table), dtype=torch.long)
    k = k_pages[idx].reshape(-1, *k_pages.shape[2:])[:length].permute(1, 0, 2)
    v = v_pages[idx].reshape(-1, *v_pages.shape[2:])[:length].permute(1, 0, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(1), k, v).squeeze(1)
''',
}

EX3_WRONG = {
    "garbage slots included": (("keys = k_pages[table].flatten(0, 1)[:length]", "keys = k_pages[table].flatten(0, 1)"),
                               None),
    "no scale": (("scores = torch.einsum(\"hd,thd->ht\", q, keys) / math.sqrt(q.shape[-1])",
                  "scores = torch.einsum(\"hd,thd->ht\", q, keys)"), None),
    "blocks read in order": (("table = torch.as_tensor(block_table, dtype=torch.long, device=k_pages.device)",
                              "table = torch.arange(len(block_table))"), "block table"),
    "softmax over heads": (("torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=0)"), None),
}


def test_ex3_correct_alternative_gets_full_marks():
    check_correct("ex3", EX3_CORRECT["gather, then PyTorch's fused attention"])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    (old, new), message = EX3_WRONG[name]
    check_wrong("ex3", mutate("ex3", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 4: distillation loss
# ---------------------------------------------------------------------------------------------

EX4_CORRECT = {
    "softmax and log of the probabilities, double precision": '''
def distillation_loss(student_logits, teacher_logits, temperature):
    V = teacher_logits.shape[-1]
    t = (teacher_logits.reshape(-1, V).double() / temperature)
    s = (student_logits.reshape(-1, V).double() / temperature)
    log_t = t - torch.logsumexp(t, -1, keepdim=True)
    log_s = s - torch.logsumexp(s, -1, keepdim=True)
    per_row = torch.sum(torch.exp(log_t) * (log_t - log_s), dim=-1)
    return (temperature * temperature * per_row.sum() / per_row.numel()).float()
''',
}

EX4_WRONG = {
    "no T squared": (("return kl.mean() * temperature ** 2", "return kl.mean()"), "no T**2 factor"),
    "reverse KL": (("kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)",
                    "kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1)"), "other way round"),
    "mean over every entry": (("kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)",
                               "kl = (log_p_t.exp() * (log_p_t - log_p_s))"), "every entry"),
    "temperature only on the student": (("log_p_t = torch.log_softmax(teacher_logits.reshape(-1, V) / temperature, dim=-1)",
                                         "log_p_t = torch.log_softmax(teacher_logits.reshape(-1, V), dim=-1)"), None),
    "student detached": (("log_p_s = torch.log_softmax(student_logits.reshape(-1, V) / temperature, dim=-1)",
                          "log_p_s = torch.log_softmax(student_logits.detach().reshape(-1, V) / temperature, dim=-1)"), None),
    "sum over the batch": (("return kl.mean() * temperature ** 2", "return kl.sum() * temperature ** 2"), None),
}


def test_ex4_correct_alternative_gets_full_marks():
    check_correct("ex4", EX4_CORRECT["softmax and log of the probabilities, double precision"])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    (old, new), message = EX4_WRONG[name]
    check_wrong("ex4", mutate("ex4", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 5: speculative decoding's accept/reject rule
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "ratio with a guard, residual via torch.where": '''
def verify_draft(draft_tokens, q_probs, p_probs, generator=None):
    accepted = []
    for i in range(len(draft_tokens)):
        x = int(draft_tokens[i])
        ratio = float(p_probs[i, x] / q_probs[i, x]) if float(q_probs[i, x]) > 0 else float("inf")
        if float(torch.rand((), generator=generator)) < min(1.0, ratio):
            accepted.append(x)
        else:
            diff = p_probs[i] - q_probs[i]
            residual = torch.where(diff > 0, diff, torch.zeros_like(diff))
            total = float(residual.sum())
            probs = residual / total if total > 0 else p_probs[i]
            return accepted + [int(torch.multinomial(probs, 1, generator=generator).item())]
    bonus = torch.multinomial(p_probs[len(accepted)], 1, generator=generator)
    return accepted + [int(bonus.item())]
''',
}

EX5_WRONG = {
    "ratio inverted": (("if u * q_probs[i, token] < p_probs[i, token]:", "if u * p_probs[i, token] < q_probs[i, token]:"),
                       "total variation"),
    "residual is p": (("residual = torch.clamp(p_probs[i] - q_probs[i], min=0)", "residual = p_probs[i].clone()"),
                      "total variation"),
    "always accept": (("if u * q_probs[i, token] < p_probs[i, token]:", "if True:"), None),
    "no bonus token": (("    out.append(int(torch.multinomial(p_probs[len(draft_tokens)], 1, generator=generator)))\n    return out",
                        "    return out"), None),
    "keeps going after a rejection": (("        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))\n        return out",
                                       "        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))\n        continue"),
                                      None),
}


def test_ex5_correct_alternative_gets_full_marks():
    check_correct("ex5", EX5_CORRECT["ratio with a guard, residual via torch.where"])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message = EX5_WRONG[name]
    check_wrong("ex5", mutate("ex5", (old, new)), message)
