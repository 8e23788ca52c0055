"""Mutation tests of Phase 3's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
and (with tests/test_exercises_every_phase.py) the untouched stub earns nothing."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/03_pretraining/pretraining.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex8"]


def test_phase_has_the_eight_exercises_in_order():
    assert NB.exercises() == EXERCISES


check_correct = NB.assert_full_marks
check_wrong = NB.assert_loses_points


# ---------------------------------------------------------------------------------------------
# Exercise 1: BPE training
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "tuples of strings, max with a negated-id key": '''
def train_bpe(text, num_merges):
    counts = collections.Counter(split_words(text))
    token_id = {ch: i for i, ch in enumerate(sorted(set(text)))}
    words = [(tuple(word), n) for word, n in counts.items()]
    merges = []
    while len(merges) < num_merges:
        pairs = {}
        for symbols, n in words:
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], -token_id[p[0]], -token_id[p[1]]))
        token_id[a + b] = len(token_id)
        merges.append((a, b))
        new_words = []
        for symbols, n in words:
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words.append((tuple(out), n))
        words = new_words
    return merges
''',
    "sorted candidates and a recursive merge": '''
def _merge(ids, pair, new_id):
    if len(ids) < 2:
        return list(ids)
    if (ids[0], ids[1]) == pair:
        return [new_id] + _merge(ids[2:], pair, new_id)
    return [ids[0]] + _merge(ids[1:], pair, new_id)


def train_bpe(text, num_merges):
    vocab = sorted(set(text))
    words = collections.Counter(tuple(vocab.index(c) for c in w) for w in split_words(text))
    merges = []
    for _ in range(num_merges):
        stats = collections.defaultdict(int)
        for ids, n in words.items():
            for i in range(len(ids) - 1):
                stats[ids[i], ids[i + 1]] += n
        if not stats:
            break
        best = sorted(stats.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append((vocab[best[0]], vocab[best[1]]))
        words = collections.Counter({tuple(_merge(list(ids), best, len(vocab) - 1)): n for ids, n in words.items()})
    return merges
''',
}

EX1_WRONG = {
    "ties broken by the strings": (("key=lambda pair: (-pairs[pair], pair)",
                                    "key=lambda pair: (-pairs[pair], tokens[pair[0]], tokens[pair[1]])"),
                                   "the library's is"),
    "ties broken by first appearance (Counter.most_common)": (
        ("best = min(pairs, key=lambda pair: (-pairs[pair], pair))", "best = pairs.most_common(1)[0][0]"),
        "smallest pair of ids"),
    "distinct words counted once": (("pairs[pair] += count", "pairs[pair] += 1"), None),
    "pairs counted across words": (("collections.Counter(split_words(text))", "collections.Counter([text])"),
                                   "never cross"),
    "merged right to left": (("""            merged, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            words[word] = merged""", """            merged, i = [], len(ids) - 1
            while i >= 0:
                if i >= 1 and (ids[i - 1], ids[i]) == best:
                    merged.append(new_id)
                    i -= 2
                else:
                    merged.append(ids[i])
                    i -= 1
            words[word] = merged[::-1]"""), "left to right"),
    "no early stop": (("        if not pairs:\n            break\n", ""), None),
    "one merge too few": (("for _ in range(num_merges):", "for _ in range(num_merges - 1):"), "merges"),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    check_correct("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    (old, new), message = EX1_WRONG[name]
    check_wrong("ex1", mutate("ex1", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 2: BPE encoding and decoding
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "merges applied one after the other, in the order learned": '''
def bpe_encode(text, alphabet, merges):
    first_merge_id = 256 + len(alphabet)
    ids_of = {ch: 256 + i for i, ch in enumerate(alphabet)}
    for r, (a, b) in enumerate(merges):
        ids_of.setdefault(a + b, first_merge_id + r)
    out = []
    for word in split_words(text):
        ids = []
        for ch in word:
            ids += [ids_of[ch]] if ch in alphabet else list(ch.encode("utf-8"))
        for a, b in merges:
            pair, merged, i = (ids_of[a], ids_of[b]), [], 0
            while i < len(ids):
                if tuple(ids[i:i + 2]) == pair:
                    merged.append(ids_of[a + b])
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        out += ids
    return out


def bpe_decode(ids, alphabet, merges):
    vocab = bpe_vocabulary(alphabet, merges)
    return b"".join(bytes([i]) if i < 256 else vocab[i].encode() for i in ids).decode("utf-8", "replace")
''',
    "strings instead of ids, and no word split (merges never cross a space anyway)": '''
def bpe_encode(text, alphabet, merges):
    rank = {pair: r for r, pair in enumerate(merges)}
    known = set(alphabet)
    pieces = []
    for ch in text:
        pieces += [ch] if ch in known else [bytes([b]) for b in ch.encode("utf-8")]
    while True:
        candidates = [(rank[(a, b)], i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))
                      if isinstance(a, str) and isinstance(b, str) and (a, b) in rank]
        if not candidates:
            break
        best = merges[min(candidates)[0]]
        out, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                out.append(best[0] + best[1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    index = {tok: i for i, tok in enumerate(bpe_vocabulary(alphabet, merges)) if i >= 256}
    return [p[0] if isinstance(p, bytes) else index[p] for p in pieces]


def bpe_decode(ids, alphabet, merges):
    vocab = bpe_vocabulary(alphabet, merges)
    data = [bytes([i]) if i < 256 else vocab[i].encode("utf-8") for i in ids]
    return b"".join(data).decode("utf-8", errors="replace")
''',
}

EX2_WRONG = {
    "unknown characters dropped": (("                ids.extend(ch.encode(\"utf-8\"))", "                pass"),
                                   "Characters outside the alphabet"),
    "unknown characters become one id": (("                ids.extend(ch.encode(\"utf-8\"))",
                                          "                ids.append(0)"), "Characters outside the alphabet"),
    "alphabet ids without the 256 byte tokens": (
        ("ids_of = {token: i for i, token in enumerate(vocab) if i >= 256}",
         "ids_of = {token: i - 256 for i, token in enumerate(vocab) if i >= 256}"), None),
    "latest merge first": (("key=lambda pair: rank.get(pair, math.inf))", "key=lambda pair: -rank.get(pair, -1))"),
                           None),
    "each token decoded on its own": (
        ("""    data = bytearray()
    for i in ids:
        data += bytes([i]) if i < 256 else vocab[i].encode("utf-8")
    return data.decode("utf-8", errors="replace")""",
         """    return "".join((bytes([i]) if i < 256 else vocab[i].encode("utf-8")).decode("utf-8", errors="replace")
                   for i in ids)"""), "Decode all the bytes together"),
}


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_alternatives_get_full_marks(name):
    check_correct("ex2", EX2_CORRECT[name])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    (old, new), message = EX2_WRONG[name]
    check_wrong("ex2", mutate("ex2", (old, new)), message)


def test_ex2_greedy_longest_match_is_not_bpe():
    source = '''
def bpe_encode(text, alphabet, merges):
    vocab = bpe_vocabulary(alphabet, merges)
    index = {tok: i for i, tok in enumerate(vocab) if i >= 256}
    out = []
    for word in split_words(text):
        i = 0
        while i < len(word):
            for j in range(len(word), i, -1):
                if word[i:j] in index:
                    out.append(index[word[i:j]])
                    i = j
                    break
            else:
                out.extend(word[i].encode("utf-8"))
                i += 1
    return out


def bpe_decode(ids, alphabet, merges):
    vocab = bpe_vocabulary(alphabet, merges)
    return b"".join(bytes([i]) if i < 256 else vocab[i].encode() for i in ids).decode("utf-8", "replace")
'''
    outcome = check_wrong("ex2", source)
    assert outcome.earned["ex2_test_encode"] == 0


# ---------------------------------------------------------------------------------------------
# Exercise 3: batches
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "unfold into windows": '''
def get_batch(data, batch_size, block_size, generator=None):
    windows = data.unfold(0, block_size + 1, 1)
    rows = windows[torch.randint(len(windows), (batch_size,), generator=generator)]
    return rows[:, :-1], rows[:, 1:]
''',
    "an index grid": '''
def get_batch(data, batch_size, block_size, generator=None):
    starts = torch.randint(low=0, high=data.numel() - block_size, size=(batch_size, 1), generator=generator)
    index = starts + torch.arange(block_size)
    return data[index], data[index + 1]
''',
}

EX3_WRONG = {
    "no shift": (("y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])",
                  "y = torch.stack([data[s:s + block_size] for s in starts.tolist()])"), "shift by one is missing"),
    "shifted the wrong way": (("torch.randint(0, len(data) - block_size,", "torch.randint(1, len(data) - block_size,"),
                              ("y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])",
                               "y = torch.stack([data[s - 1:s - 1 + block_size] for s in starts.tolist()])"),
                              "wrong way"),
    "last window never drawn": (("torch.randint(0, len(data) - block_size,", "torch.randint(0, len(data) - block_size - 1,"),
                                None),
    "one start too many": (("torch.randint(0, len(data) - block_size,", "torch.randint(0, len(data) - block_size + 1,"),
                           None),
    "generator ignored": ((", generator=generator)", ")"), "pass generator"),
    "one start for the whole batch": (("(batch_size,), generator=generator)", "(1,), generator=generator).expand(batch_size)"),
                                      "all rows start at the same position"),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    check_correct("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    *replacements, message = EX3_WRONG[name]
    check_wrong("ex3", mutate("ex3", *replacements), message)


# ---------------------------------------------------------------------------------------------
# Exercise 4: MLM masking
# ---------------------------------------------------------------------------------------------

EX4_CORRECT = {
    "bernoulli selection and a categorical draw, boolean indexing": '''
def mask_tokens(ids, vocab_size, mask_id, mask_prob=0.15, generator=None):
    inputs, labels = ids.clone(), ids.clone()
    selected = torch.bernoulli(torch.full(ids.shape, float(mask_prob)), generator=generator).bool()
    labels[~selected] = -100
    kind = torch.multinomial(torch.tensor([0.8, 0.1, 0.1]), ids.numel(), replacement=True,
                             generator=generator).view(ids.shape)
    inputs[selected & (kind == 0)] = mask_id
    to_random = selected & (kind == 1)
    inputs[to_random] = torch.randint(vocab_size, (int(to_random.sum()),), generator=generator)
    return inputs, labels
''',
    "an exact share of each row selected (as the original BERT code)": '''
def mask_tokens(ids, vocab_size, mask_id, mask_prob=0.15, generator=None):
    n = ids.shape[-1]
    k = int(round(mask_prob * n))
    order = torch.rand(ids.shape, generator=generator).argsort(dim=-1)
    selected = torch.zeros(ids.shape, dtype=torch.bool).scatter(-1, order[..., :k], True)
    labels = ids.masked_fill(~selected, -100)
    u = torch.rand(ids.shape, generator=generator)
    replacement = torch.randint(0, vocab_size, ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[selected & (u < 0.1)] = replacement[selected & (u < 0.1)]
    inputs[selected & (u >= 0.2)] = mask_id
    return inputs, labels
''',
}

EX4_WRONG = {
    "labels everywhere": (("labels = torch.where(selected, ids, torch.full_like(ids, -100))", "labels = ids.clone()"),
                          "about 15% should"),
    "every selected position masked": (("selected & (choice < 0.8)", "selected"), "[MASK]"),
    "the 80/10/10 rule on every position": (("selected & (choice < 0.8)", "(choice < 0.8)"), "must keep their token"),
    "random tokens for the other 20 %": (("(choice >= 0.8) & (choice < 0.9)", "(choice >= 0.8)"), "expected 10%"),
    "generator ignored": (("torch.rand(ids.shape, generator=generator) < mask_prob", "torch.rand(ids.shape) < mask_prob"),
                          None),
    "random tokens from a part of the vocabulary": (("torch.randint(0, vocab_size,", "torch.randint(0, vocab_size // 2,"),
                                                    None),
}


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_alternatives_get_full_marks(name):
    check_correct("ex4", EX4_CORRECT[name])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    (old, new), message = EX4_WRONG[name]
    check_wrong("ex4", mutate("ex4", (old, new)), message)


def test_ex4_modifying_the_input_loses_points():
    source = mutate("ex4", ("    return inputs, labels", "    ids.copy_(inputs)\n    return inputs, labels"))
    check_wrong("ex4", source, "modified its input")


# ---------------------------------------------------------------------------------------------
# Exercise 5: AdamW
# ---------------------------------------------------------------------------------------------

EX5_HEADER = '''
class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
'''

EX5_CORRECT = {
    "PyTorch's arrangement: step size and denominator": EX5_HEADER + '''
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad.conj(), value=1 - beta2)
                bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)
''',
    "new tensors instead of in-place moments": EX5_HEADER + '''
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s = self.state[p]
                t = s.get("t", 0) + 1
                m = b1 * s.get("m", torch.zeros_like(p)) + (1 - b1) * p.grad
                v = b2 * s.get("v", torch.zeros_like(p)) + (1 - b2) * p.grad ** 2
                s.update(t=t, m=m, v=v)
                update = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
                p.copy_(p - lr * wd * p - lr * update)
''',
}

EX5_WRONG = {
    "L2 regularisation": (("                p.mul_(1 - lr * weight_decay)                    # decoupled: not part of the gradient\n"
                           "                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)\n"
                           "                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)",
                           "                grad = p.grad + weight_decay * p\n"
                           "                m.mul_(beta1).add_(grad, alpha=1 - beta1)\n"
                           "                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)"), "L2 regularisation"),
    "no bias correction": (("m_hat = m / (1 - beta1 ** t)", "m_hat = m"), None),
    "decay not scaled by the learning rate": (("p.mul_(1 - lr * weight_decay)", "p.mul_(1 - weight_decay)"),
                                              "not multiplied by the learning rate"),
    "eps inside the square root": (("(v_hat.sqrt() + eps)", "(v_hat + eps).sqrt()"), None),
    "hyperparameters from the defaults, not the group": (
        ('lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]',
         'lr, (beta1, beta2), eps, weight_decay = (self.defaults["lr"], self.defaults["betas"], self.defaults["eps"], '
         'self.defaults["weight_decay"])'), None),
    "no weight decay": (("p.mul_(1 - lr * weight_decay)", "pass"), "no weight decay"),
}


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    check_correct("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message = EX5_WRONG[name]
    check_wrong("ex5", mutate("ex5", (old, new)), message)


def test_ex5_wrapping_torch_adamw_earns_nothing_from_the_comparison():
    source = EX5_HEADER + '''
        for group in self.param_groups:
            if "inner" not in group:
                group["inner"] = torch.optim.AdamW(group["params"], lr=group["lr"], betas=group["betas"],
                                                   eps=group["eps"], weight_decay=group["weight_decay"])
            group["inner"].param_groups[0]["lr"] = group["lr"]
            group["inner"].step()
'''
    outcome = check_wrong("ex5", source, "write the update yourself")
    assert outcome.earned["ex5_test_matches_torch"] == 0


def test_ex5_state_outside_optimizer_state_fails_the_resume_test():
    source = EX5_HEADER + '''
        if not hasattr(self, "moments"):
            self.moments = {}
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                t, m, v = self.moments.get(p, (0, torch.zeros_like(p), torch.zeros_like(p)))
                t += 1
                m = beta1 * m + (1 - beta1) * p.grad
                v = beta2 * v + (1 - beta2) * p.grad ** 2
                self.moments[p] = (t, m, v)
                p.mul_(1 - lr * wd)
                p.sub_(lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps))
'''
    outcome = check_wrong("ex5", source)
    assert outcome.earned["ex5_test_decoupled"] == outcome.possible["ex5_test_decoupled"]


# ---------------------------------------------------------------------------------------------
# Exercise 6: schedule and clipping
# ---------------------------------------------------------------------------------------------

EX6_CORRECT = {
    "cosine written as a decay ratio, torch norms and clamp": '''
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    if step >= warmup_steps:
        ratio = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return float(min_lr + coeff * (max_lr - min_lr))
    return float(max_lr * (step + 1) / (warmup_steps + 1))


def clip_grad_norm(parameters, max_norm):
    grads = [p.grad for p in list(parameters) if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    total = torch.linalg.vector_norm(norms)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coefficient.to(g.dtype))
    return total
''',
    "numpy-free plain Python floats": '''
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    if step < warmup_steps:
        return (step + 1) * max_lr / (warmup_steps + 1)
    if step <= decay_steps:
        angle = math.pi * (step - warmup_steps) / (decay_steps - warmup_steps)
        return min_lr + (max_lr - min_lr) * (math.cos(angle) + 1) / 2
    return min_lr * 1.0


def clip_grad_norm(parameters, max_norm):
    params = [p for p in parameters if p.grad is not None]
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    if total > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (total + 1e-6))
    return total
''',
}

EX6_WRONG = {
    "warmup from zero": (("return max_lr * (step + 1) / (warmup_steps + 1)", "return max_lr * step / warmup_steps"),
                         "should be max_lr * 1/10"),
    "cosine over the whole run": (("progress = (step - warmup_steps) / (decay_steps - warmup_steps)",
                                   "progress = step / decay_steps"), None),
    "no floor after the decay": (("    if step > decay_steps:\n        return min_lr\n", ""), "stays at min_lr"),
    "each parameter clipped separately": (
        ("""    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    scale = min(1.0, max_norm / (float(total) + 1e-6))
    for g in grads:
        g.mul_(scale)""", """    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    for g in grads:
        g.mul_(min(1.0, max_norm / (float(g.norm()) + 1e-6)))"""), "each parameter clipped separately"),
    "small gradients scaled up": (("scale = min(1.0, max_norm / (float(total) + 1e-6))",
                                   "scale = max_norm / (float(total) + 1e-6)"), "capped at 1"),
    "norm after clipping returned": (("    return total.float()", "    return total.float() * scale"),
                                     "the norm after clipping"),
    "squared norm": (("total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))",
                      "total = sum((g.double() ** 2).sum() for g in grads)"), None),
    "parameters read twice (fails on model.parameters())": (
        ("    grads = [p.grad for p in parameters if p.grad is not None]\n",
         "    count = len([p for p in parameters])\n    grads = [p.grad for p in parameters if p.grad is not None]\n"),
        None),
}


@pytest.mark.parametrize("name", EX6_CORRECT)
def test_ex6_correct_alternatives_get_full_marks(name):
    check_correct("ex6", EX6_CORRECT[name])


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    (old, new), message = EX6_WRONG[name]
    check_wrong("ex6", mutate("ex6", (old, new)), message)


def test_ex6_schedule_and_clipping_are_graded_separately():
    outcome = NB.run("ex6", mutate("ex6", ("scale = min(1.0, max_norm / (float(total) + 1e-6))",
                                           "scale = max_norm / (float(total) + 1e-6)")))
    assert outcome.earned["ex6_test_schedule"] == outcome.possible["ex6_test_schedule"]
    assert outcome.earned["ex6_test_clipping"] == 0


# ---------------------------------------------------------------------------------------------
# Exercise 7: chunked cross-entropy
# ---------------------------------------------------------------------------------------------

EX7_CORRECT = {
    "torch.utils.checkpoint per chunk": '''
from torch.utils.checkpoint import checkpoint


def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    def chunk_loss(h, t, w):
        return F.cross_entropy(h @ w.T, t, reduction="sum")

    total = 0.0
    for start in range(0, hidden.shape[0], chunk_size):
        total = total + checkpoint(chunk_loss, hidden[start:start + chunk_size], targets[start:start + chunk_size],
                                   weight, use_reentrant=False)
    return total / hidden.shape[0]
''',
    "autograd.Function with log_softmax and one_hot": '''
class _CE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        pieces = []
        for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
            pieces.append(-F.log_softmax(h @ weight.t(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1))
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return torch.cat(pieces).mean()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets = ctx.saved_tensors
        n = hidden.shape[0]
        gh, gw = [], torch.zeros_like(weight)
        for h, t in zip(hidden.split(ctx.chunk_size), targets.split(ctx.chunk_size)):
            g = (F.softmax(h @ weight.t(), dim=-1) - F.one_hot(t, weight.shape[0]).to(h.dtype)) * (grad / n)
            gh.append(g @ weight)
            gw.addmm_(g.t(), h)
        return torch.cat(gh), gw, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    return _CE.apply(hidden, weight, targets, chunk_size)
''',
}

PLAIN_LOOP = '''
def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    total = 0.0
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = hidden[start:start + chunk_size] @ weight.T
        total = total + F.cross_entropy(chunk, targets[start:start + chunk_size], reduction="sum")
    return total / hidden.shape[0]
'''

FULL_LOGITS = '''
def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    return F.cross_entropy(hidden @ weight.T, targets)
'''

MEAN_OF_MEANS = '''
def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    from torch.utils.checkpoint import checkpoint
    means = [checkpoint(lambda h, t: F.cross_entropy(h @ weight.T, t), hidden[s:s + chunk_size],
                        targets[s:s + chunk_size], use_reentrant=False) for s in range(0, len(hidden), chunk_size)]
    return torch.stack(means).mean()
'''


def test_ex7_correct_alternatives_get_full_marks():
    for name, source in EX7_CORRECT.items():
        outcome = NB.run("ex7", source)
        assert outcome.full_marks, (name, outcome.errors)


def test_ex7_plain_loop_keeps_every_chunk_and_loses_the_memory_points():
    outcome = check_wrong("ex7", PLAIN_LOOP, "each chunk's logits are saved")
    assert outcome.earned["ex7_test_values"] == outcome.possible["ex7_test_values"]
    assert outcome.earned["ex7_test_memory"] == 0


def test_ex7_full_logits_lose_the_memory_points():
    outcome = check_wrong("ex7", FULL_LOGITS)
    assert outcome.earned["ex7_test_memory"] == 0


def test_ex7_mean_of_chunk_means_is_wrong():
    check_wrong("ex7", MEAN_OF_MEANS, "mean of the chunk means")


@pytest.mark.parametrize("old,new", [
    ("grad_weight += grad_logits.T @ h", "pass"),                          # no gradient for the unembedding
    ("grad_logits *= grad_output / n", "grad_logits *= 1.0 / n"),           # upstream gradient ignored
    ("return total / n", "return total"),                                   # a sum, not a mean
])
def test_ex7_mistakes_in_the_backward_lose_points(old, new):
    check_wrong("ex7", mutate("ex7", (old, new)))


# ---------------------------------------------------------------------------------------------
# Exercise 8: top-k, top-p, sampling
# ---------------------------------------------------------------------------------------------

EX8_CORRECT = {
    "Hugging Face's arrangement: ascending sort, remove the tail of mass 1 - p": '''
def filter_logits(logits, top_k=None, top_p=None):
    out = logits.clone()
    if top_k is not None:
        k = min(top_k, out.size(-1))
        remove = out < torch.topk(out, k)[0][..., -1, None]
        out = out.masked_fill(remove, -float("inf"))
    if top_p is not None:
        sorted_logits, sorted_indices = torch.sort(out, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= (1 - top_p)
        sorted_remove[..., -1:] = False
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
        out = out.masked_fill(remove, -float("inf"))
    return out


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(F.softmax(filtered, dim=-1), num_samples=1, generator=generator).squeeze(-1)
''',
    "row by row in Python, inverse-CDF sampling": '''
def filter_logits(logits, top_k=None, top_p=None):
    flat = logits.reshape(-1, logits.shape[-1]).clone()
    for row in flat:
        order = torch.argsort(row, descending=True).tolist()
        keep = order[:top_k] if top_k is not None else order
        if top_p is not None:
            probs = torch.softmax(row[keep], dim=0).tolist()
            mass, nucleus = 0.0, []
            for index, prob in zip(keep, probs):
                if mass >= top_p:
                    break
                nucleus.append(index)
                mass += prob
            keep = nucleus
        dropped = torch.ones(row.shape[0], dtype=torch.bool)
        dropped[keep] = False
        row[dropped] = float("-inf")
    return flat.reshape(logits.shape)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    if temperature == 0:
        return logits.max(dim=-1).indices
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(probs.shape[-1] - 1)[:, 0]
''',
}

EX8_WRONG = {
    "the token that crosses p left out": (("before >= top_p", "probs.cumsum(dim=-1) > top_p"), "smallest set"),
    "top-p on the distribution before top-k": (
        ("probs = torch.softmax(sorted_logits, dim=-1)", "probs = torch.softmax(torch.gather(original, -1, order), dim=-1)"),
        ("    logits = logits.clone()\n", "    logits = logits.clone()\n    original = logits.clone()\n"),
        "renormalised"),
    "top-k keeps the smallest": (("torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]\n"
                                  "        logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
                                  "torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1, largest=False).values[..., -1:]\n"
                                  "        logits = logits.masked_fill(logits > kth, float(\"-inf\"))"),
                                 "two most likely"),
    "temperature multiplies": (("filter_logits(logits / temperature, top_k, top_p)",
                                "filter_logits(logits * temperature, top_k, top_p)"), "multiplied by the temperature"),
    "temperature after the filters": (("probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)",
                                       "probs = torch.softmax(filter_logits(logits, top_k, top_p) / temperature, dim=-1)"),
                                      None),
    "no greedy case": (("    if temperature == 0:\n        return logits.argmax(dim=-1)\n", ""), None),
    "generator ignored": (("torch.multinomial(probs, 1, generator=generator)", "torch.multinomial(probs, 1)"), None),
}


@pytest.mark.parametrize("name", EX8_CORRECT)
def test_ex8_correct_alternatives_get_full_marks(name):
    check_correct("ex8", EX8_CORRECT[name])


@pytest.mark.parametrize("name", EX8_WRONG)
def test_ex8_mistakes_lose_points(name):
    *replacements, message = EX8_WRONG[name]
    check_wrong("ex8", mutate("ex8", *replacements), message)


def test_ex8_modifying_the_logits_in_place_loses_points():
    source = mutate("ex8", ("    logits = logits.clone()\n", ""),
                    ("logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
                     "logits.masked_fill_(logits < kth, float(\"-inf\"))"))
    check_wrong("ex8", source, "modified its input")
