"""Mutation tests of Phase 3's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
and (with tests/test_exercises_every_phase.py) the untouched stub earns nothing."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/03_pretraining/pretraining.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex8", "ex9", "ex10", "ex11"]


def test_phase_has_the_eleven_exercises_in_order():
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
# Exercise 5: ELECTRA's replaced-token detection loss
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "logsigmoid of both signs": '''
def replaced_token_loss(disc_logits, corrupted, original):
    y = (corrupted != original).float().to(disc_logits.dtype)
    return -(y * F.logsigmoid(disc_logits) + (1 - y) * F.logsigmoid(-disc_logits)).mean()
''',
    "the max(z, 0) - z y + log1p(exp(-|z|)) form, summed then divided": '''
def replaced_token_loss(disc_logits, corrupted, original):
    z = disc_logits
    y = torch.where(corrupted == original, 0.0, 1.0).to(z.dtype)
    per_position = z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
    return per_position.sum() / z.numel()
''',
}

EX5_WRONG = {
    "log of the sigmoid (overflows)": (
        ("return (replaced * F.softplus(-disc_logits) + (1 - replaced) * F.softplus(disc_logits)).mean()",
         "p = torch.sigmoid(disc_logits)\n    return -(replaced * torch.log(p) + (1 - replaced) * torch.log(1 - p)).mean()"),
        "softplus or logsigmoid"),
    "labels inverted": (("replaced = (corrupted != original)", "replaced = (corrupted == original)"), "labels inverted"),
    "sum instead of mean": ((".mean()", ".sum()"), "sum over positions"),
    "signs of the softplus swapped": (("replaced * F.softplus(-disc_logits) + (1 - replaced) * F.softplus(disc_logits)",
                                       "replaced * F.softplus(disc_logits) + (1 - replaced) * F.softplus(-disc_logits)"),
                                      None),
}


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    check_correct("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message = EX5_WRONG[name]
    check_wrong("ex5", mutate("ex5", (old, new)), message)


def test_ex5_labels_from_the_mask_lose_points():
    # Every position the generator touched labelled "replaced", even where it sampled the original token:
    # the function cannot see the mask, so the nearest version of this slip labels by a second sample.
    source = '''
def replaced_token_loss(disc_logits, corrupted, original):
    y = torch.ones_like(disc_logits)
    return (y * F.softplus(-disc_logits) + (1 - y) * F.softplus(disc_logits)).mean()
'''
    check_wrong("ex5", source)


# ---------------------------------------------------------------------------------------------
# Exercise 6: AdamW
# ---------------------------------------------------------------------------------------------

EX6_HEADER = '''
class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
'''

EX6_CORRECT = {
    "PyTorch's arrangement: step size and denominator": EX6_HEADER + '''
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
    "new tensors instead of in-place moments": EX6_HEADER + '''
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

EX6_WRONG = {
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


@pytest.mark.parametrize("name", EX6_CORRECT)
def test_ex6_correct_alternatives_get_full_marks(name):
    check_correct("ex6", EX6_CORRECT[name])


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    (old, new), message = EX6_WRONG[name]
    check_wrong("ex6", mutate("ex6", (old, new)), message)


def test_ex6_wrapping_torch_adamw_earns_nothing_from_the_comparison():
    source = EX6_HEADER + '''
        for group in self.param_groups:
            if "inner" not in group:
                group["inner"] = torch.optim.AdamW(group["params"], lr=group["lr"], betas=group["betas"],
                                                   eps=group["eps"], weight_decay=group["weight_decay"])
            group["inner"].param_groups[0]["lr"] = group["lr"]
            group["inner"].step()
'''
    outcome = check_wrong("ex6", source, "write the update yourself")
    assert outcome.earned["ex6_test_matches_torch"] == 0


def test_ex6_state_outside_optimizer_state_fails_the_resume_test():
    source = EX6_HEADER + '''
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
    outcome = check_wrong("ex6", source)
    assert outcome.earned["ex6_test_decoupled"] == outcome.possible["ex6_test_decoupled"]


# ---------------------------------------------------------------------------------------------
# Exercise 7: schedule and clipping
# ---------------------------------------------------------------------------------------------

EX7_CORRECT = {
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

EX7_WRONG = {
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


@pytest.mark.parametrize("name", EX7_CORRECT)
def test_ex7_correct_alternatives_get_full_marks(name):
    check_correct("ex7", EX7_CORRECT[name])


@pytest.mark.parametrize("name", EX7_WRONG)
def test_ex7_mistakes_lose_points(name):
    (old, new), message = EX7_WRONG[name]
    check_wrong("ex7", mutate("ex7", (old, new)), message)


def test_ex7_schedule_and_clipping_are_graded_separately():
    outcome = NB.run("ex7", mutate("ex7", ("scale = min(1.0, max_norm / (float(total) + 1e-6))",
                                           "scale = max_norm / (float(total) + 1e-6)")))
    assert outcome.earned["ex7_test_schedule"] == outcome.possible["ex7_test_schedule"]
    assert outcome.earned["ex7_test_clipping"] == 0


# ---------------------------------------------------------------------------------------------
# Exercise 8: chunked cross-entropy
# ---------------------------------------------------------------------------------------------

EX8_CORRECT = {
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
    means = [F.cross_entropy(hidden[s:s + chunk_size] @ weight.T, targets[s:s + chunk_size])
             for s in range(0, len(hidden), chunk_size)]
    return torch.stack(means).mean()
'''


@pytest.mark.parametrize("name", EX8_CORRECT)
def test_ex8_correct_alternatives_get_full_marks(name):
    outcome = NB.run("ex8", EX8_CORRECT[name])
    assert outcome.full_marks, (name, outcome.errors)


def test_ex8_plain_loop_keeps_every_chunk_and_loses_the_memory_points():
    outcome = check_wrong("ex8", PLAIN_LOOP, "each chunk's logits are saved")
    assert outcome.earned["ex8_test_values"] == outcome.possible["ex8_test_values"]
    assert outcome.earned["ex8_test_memory"] == 0


def test_ex8_full_logits_lose_the_memory_points():
    outcome = check_wrong("ex8", FULL_LOGITS)
    assert outcome.earned["ex8_test_memory"] == 0


def test_ex8_mean_of_chunk_means_is_wrong():
    check_wrong("ex8", MEAN_OF_MEANS, "mean of the chunk means")


@pytest.mark.parametrize("old,new", [
    ("grad_weight += grad_logits.T @ h", "pass"),                          # no gradient for the unembedding
    ("grad_logits *= grad_output / n", "grad_logits *= 1.0 / n"),           # upstream gradient ignored
    ("return total / n", "return total"),                                   # a sum, not a mean
])
def test_ex8_mistakes_in_the_backward_lose_points(old, new):
    check_wrong("ex8", mutate("ex8", (old, new)))


# ---------------------------------------------------------------------------------------------
# Exercise 9: top-k, top-p, sampling
# ---------------------------------------------------------------------------------------------

EX9_CORRECT = {
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

EX9_WRONG = {
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


@pytest.mark.parametrize("name", EX9_CORRECT)
def test_ex9_correct_alternatives_get_full_marks(name):
    check_correct("ex9", EX9_CORRECT[name])


@pytest.mark.parametrize("name", EX9_WRONG)
def test_ex9_mistakes_lose_points(name):
    *replacements, message = EX9_WRONG[name]
    check_wrong("ex9", mutate("ex9", *replacements), message)


def test_ex9_modifying_the_logits_in_place_loses_points():
    source = mutate("ex9", ("    logits = logits.clone()\n", ""),
                    ("logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
                     "logits.masked_fill_(logits < kth, float(\"-inf\"))"))
    check_wrong("ex9", source, "modified its input")


# ---------------------------------------------------------------------------------------------
# Exercise 10: one training step with gradient accumulation, and the evaluation
# ---------------------------------------------------------------------------------------------

EX10_CORRECT = {
    "gradients set to None by hand, zip over range first, losses stacked, inference_mode": '''
def train_step(model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm, clip_grad_norm):
    for p in model.parameters():
        p.grad = None
    losses = []
    for _, (x, y) in zip(range(grad_accum_steps), batches):
        loss = model(x, y)[1]
        (loss * (1.0 / grad_accum_steps)).backward()
        losses.append(loss.detach())
    if max_grad_norm is not None and max_grad_norm > 0:
        clip_grad_norm(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return torch.stack(losses).mean().item()


def evaluate(model, batches):
    mode = model.training
    model.train(False)
    with torch.inference_mode():
        total = sum(model(x, y)[1] for x, y in batches)
    model.train(mode)
    return float(total / len(batches))
''',
    "token-weighted accumulation, zeroed in place, a decorated evaluate with try/finally": '''
def train_step(model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm, clip_grad_norm):
    micro = [next(batches) for _ in range(grad_accum_steps)]
    tokens = sum(y.numel() for _, y in micro)
    optimizer.zero_grad(set_to_none=False)
    total = 0.0
    for x, y in micro:
        _, loss = model(x, y)
        (loss * y.numel() / tokens).backward()
        total += loss.item() * y.numel()
    if max_grad_norm:
        clip_grad_norm(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total / tokens


@torch.no_grad()
def evaluate(model, batches):
    was = model.training
    model.eval()
    try:
        return sum(model(x, y)[1].item() for x, y in batches) / len(batches)
    finally:
        model.train(was)
''',
}

EX10_WRONG = {
    "loss not divided by grad_accum_steps": (("(loss / grad_accum_steps).backward()", "loss.backward()"),
                                             "not divided by grad_accum_steps"),
    "zero_grad before every micro-batch": (("        x, y = next(batches)\n",
                                            "        x, y = next(batches)\n        optimizer.zero_grad(set_to_none=True)\n"),
                                           "zero_grad before every micro-batch"),
    "no zero_grad": (("    optimizer.zero_grad(set_to_none=True)        # stale gradients must not count\n", ""),
                     "no zero_grad"),
    "zero_grad only after the step": (
        ("    optimizer.zero_grad(set_to_none=True)        # stale gradients must not count\n", ""),
        ("    scheduler.step()\n", "    scheduler.step()\n    optimizer.zero_grad(set_to_none=True)\n"),
        "zero_grad only after optimizer.step"),
    "clipping after every micro-batch": (
        ("        total += loss.item()\n",
         "        total += loss.item()\n        if max_grad_norm:\n            clip_grad_norm(model.parameters(), max_grad_norm)\n"),
        ("    if max_grad_norm:\n        clip_grad_norm(model.parameters(), max_grad_norm)   # once, on the whole batch's gradient\n", ""),
        "was called 6 times"),
    "clipping after the optimizer step": (
        ("    if max_grad_norm:\n        clip_grad_norm(model.parameters(), max_grad_norm)   # once, on the whole batch's gradient\n"
         "    optimizer.step()\n",
         "    optimizer.step()\n    if max_grad_norm:\n        clip_grad_norm(model.parameters(), max_grad_norm)\n"),
        "clipping after optimizer.step"),
    "no clipping": (("        clip_grad_norm(model.parameters(), max_grad_norm)   # once, on the whole batch's gradient\n",
                     "        pass\n"), "was called 0 times"),
    "scheduler stepped after every micro-batch": (
        ("        total += loss.item()\n", "        total += loss.item()\n        scheduler.step()\n"),
        ("    optimizer.step()\n    scheduler.step()\n", "    optimizer.step()\n"),
        "scheduler.step() after every micro-batch"),
    "one micro-batch too many taken (zip with the iterator first)": (
        ("    for _ in range(grad_accum_steps):\n        x, y = next(batches)\n",
         "    for (x, y), _ in zip(batches, range(grad_accum_steps)):\n"),
        "micro-batches from `batches` instead of 6"),
    "the last micro-batch's loss returned": (("    return total / grad_accum_steps", "    return loss.item()"),
                                             "the losses train_step returned"),
    "clipping at max_grad_norm=0 (only None skipped)": (("    if max_grad_norm:\n", "    if max_grad_norm is not None:\n"),
                                                        None),
    "evaluation in training mode": (("    model.eval()\n", ""), "dropout was on"),
    "evaluation with autograd on": (("    with torch.no_grad():\n", "    if True:\n"), "autograd on"),
    "mode not restored": (("    model.train(was_training)\n", ""), "restore the mode"),
    "always back to training mode": (("model.train(was_training)", "model.train()"), None),
    "sum of the batch losses": (("return sum(losses) / len(losses)", "return sum(losses)"), "the mean loss over the batches"),
}


@pytest.mark.parametrize("name", EX10_CORRECT)
def test_ex10_correct_alternatives_get_full_marks(name):
    check_correct("ex10", EX10_CORRECT[name])


@pytest.mark.parametrize("name", EX10_WRONG)
def test_ex10_mistakes_lose_points(name):
    *replacements, message = EX10_WRONG[name]
    check_wrong("ex10", mutate("ex10", *replacements), message)


def test_ex10_step_and_evaluation_are_graded_separately():
    outcome = NB.run("ex10", mutate("ex10", ("(loss / grad_accum_steps).backward()", "loss.backward()"),
                                    ("    model.eval()\n", "")))
    assert outcome.earned == {"ex10_test_step": 0, "ex10_test_evaluate": 0}
    outcome = NB.run("ex10", mutate("ex10", ("(loss / grad_accum_steps).backward()", "loss.backward()")))
    assert outcome.earned["ex10_test_evaluate"] == outcome.possible["ex10_test_evaluate"]
    assert outcome.earned["ex10_test_step"] == 0
    outcome = NB.run("ex10", mutate("ex10", ("    model.eval()\n", "")))
    assert outcome.earned["ex10_test_step"] == outcome.possible["ex10_test_step"]
    assert outcome.earned["ex10_test_evaluate"] == 0


def test_ex10_every_mistake_the_tests_name_is_caught_by_the_hidden_tests_alone():
    """Each entry of pretraining.TRAIN_STEP_MISTAKES, submitted as the student's step, scores 0 on the step cell."""
    from utils import pretraining

    evaluate = "def evaluate" + NB.solution_source("ex10").split("def evaluate", 1)[1]
    for key in pretraining.TRAIN_STEP_MISTAKES:
        source = (f"def train_step(*args):\n    return pretraining.train_step_with_mistake({key!r}, *args)\n\n\n"
                  + evaluate)
        outcome = NB.run("ex10", source)
        assert outcome.earned["ex10_test_step"] == 0, key


# ---------------------------------------------------------------------------------------------
# Exercise 11: checkpoints that resume bit for bit
# ---------------------------------------------------------------------------------------------

EX11_CORRECT = {
    "a tuple of parts, random states as lists of ints": '''
def save_checkpoint(path, *, model, optimizer, scheduler, generator, step):
    parts = (step, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
             generator.get_state().tolist(), torch.get_rng_state().tolist())
    torch.save(parts, str(path))


def load_checkpoint(path, *, model, optimizer, scheduler, generator):
    step, weights, opt_state, sched_state, gen_state, rng_state = torch.load(str(path), weights_only=True)
    torch.set_rng_state(torch.tensor(rng_state, dtype=torch.uint8))
    generator.set_state(torch.tensor(gen_state, dtype=torch.uint8))
    scheduler.load_state_dict(sched_state)
    optimizer.load_state_dict(opt_state)
    model.load_state_dict(weights)
    return step
''',
    "copies of the state dicts, written through an open file": '''
import copy


def save_checkpoint(path, *, model, optimizer, scheduler, generator, step):
    state = {"weights": {k: v.clone() for k, v in model.state_dict().items()},
             "opt": copy.deepcopy(optimizer.state_dict()), "sched": dict(scheduler.state_dict()),
             "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()}, "step": torch.tensor(step)}
    with open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path, *, model, optimizer, scheduler, generator):
    with open(path, "rb") as f:
        state = torch.load(f, weights_only=True)
    model.load_state_dict(state["weights"], strict=True)
    optimizer.load_state_dict(state["opt"])
    scheduler.load_state_dict(state["sched"])
    generator.set_state(state["rng"]["data"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["step"].item())
''',
}

EX11_WRONG = {
    "optimizer state not restored": (("    optimizer.load_state_dict(state[\"optimizer\"])\n", ""), "optimizer's state"),
    "scheduler not restored": (("    scheduler.load_state_dict(state[\"scheduler\"])\n", ""), "scheduler was not restored"),
    "data generator not restored": (("    generator.set_state(state[\"generator\"])\n", ""), "data generator"),
    "global random state not restored": (("    torch.set_rng_state(state[\"torch_rng\"])\n", ""), "global random state"),
    "global random state reseeded instead": (("    torch.set_rng_state(state[\"torch_rng\"])\n", "    torch.manual_seed(0)\n"),
                                             "global random state"),
    "step not returned": (("    return int(state[\"step\"])", "    return None"), "saved step"),
    "the step as a tensor": (("\"step\": int(step)", "\"step\": torch.tensor(step)"), ("return int(state[\"step\"])", "return state[\"step\"]"),
                             "as an int"),
    "the model object pickled, not its state dict": (
        ("torch.save({\"model\": model.state_dict(),", "torch.save({\"model\": model,"),
        ("state = torch.load(path, weights_only=True)", "state = torch.load(path, weights_only=False)"),
        ("model.load_state_dict(state[\"model\"])", "model.load_state_dict(state[\"model\"].state_dict())"),
        "weights_only=True"),
}


@pytest.mark.parametrize("name", EX11_CORRECT)
def test_ex11_correct_alternatives_get_full_marks(name):
    check_correct("ex11", EX11_CORRECT[name])


@pytest.mark.parametrize("name", EX11_WRONG)
def test_ex11_mistakes_lose_points(name):
    *replacements, message = EX11_WRONG[name]
    check_wrong("ex11", mutate("ex11", *replacements), message)


def test_ex11_state_kept_in_memory_loses_points():
    """The file holds a key, the state stays in a Python dictionary: the file alone must carry the state."""
    source = '''
_KEPT = {}


def save_checkpoint(path, *, model, optimizer, scheduler, generator, step):
    key = len(_KEPT)
    _KEPT[key] = {k: copy.deepcopy(v) for k, v in dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                  scheduler=scheduler.state_dict(), generator=generator.get_state(), rng=torch.get_rng_state(),
                  step=step).items()}
    torch.save({"key": key}, path)


def load_checkpoint(path, *, model, optimizer, scheduler, generator):
    state = _KEPT[torch.load(path, weights_only=True)["key"]]
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    return state["step"]
'''
    outcome = NB.run("ex11", "import copy\n" + source)
    assert outcome.earned["ex11_test_file"] == 0, outcome.messages


def test_ex11_last_saved_state_loses_points():
    """A load that restores whatever was saved last, not what the file holds, fails the resume test."""
    source = NB.solution_source("ex11").replace(
        "    torch.save({", "    global _LAST\n    _LAST = path\n    torch.save({").replace(
        "state = torch.load(path, weights_only=True)", "state = torch.load(_LAST, weights_only=True)")
    assert "_LAST" in source
    outcome = NB.run("ex11", source)
    assert outcome.earned["ex11_test_resume"] == 0, outcome.messages


# ---------------------------------------------------------------------------------------------
# Shortcuts: the library or course call that does an exercise's work earns nothing
# (tests/test_shortcuts_every_phase.py runs every row through every test cell of its exercise)
# ---------------------------------------------------------------------------------------------

SHORTCUTS = {
    "ex1": {
        "the course's library reference (pretraining.library_bpe_merges)": '''
def train_bpe(text, num_merges):
    return pretraining.library_bpe_merges(text, num_merges)
''',
        "Hugging Face tokenizers' BpeTrainer called directly": '''
def train_bpe(text, num_merges):
    import json
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=len(set(text)) + num_merges, show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator([text], trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]
''',
    },
    "ex2": {
        "the course's library tokenizer (library_bpe_tokenizer(...).encode(...).ids / .decode)": '''
def bpe_encode(text, alphabet, merges):
    return pretraining.library_bpe_tokenizer(alphabet, merges).encode(text).ids


def bpe_decode(ids, alphabet, merges):
    return pretraining.library_bpe_tokenizer(alphabet, merges).decode(ids)
''',
    },
    "ex3": {
        "the course's reference sampler (pretraining.random_batch)": '''
def get_batch(data, batch_size, block_size, generator=None):
    return pretraining.random_batch(data, batch_size, block_size, generator)
''',
    },
    "ex4": {
        "transformers' DataCollatorForLanguageModeling": '''
def mask_tokens(ids, vocab_size, mask_id, mask_prob=0.15, generator=None):
    from transformers import DataCollatorForLanguageModeling

    class Vocabulary:
        mask_token, pad_token = "[MASK]", None

        def __len__(self):
            return vocab_size

        def convert_tokens_to_ids(self, token):
            return mask_id

    collator = DataCollatorForLanguageModeling(Vocabulary(), mlm_probability=mask_prob)
    return collator.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.zeros_like(ids, dtype=torch.bool))
''',
    },
    "ex5": {
        "PyTorch's binary_cross_entropy_with_logits": '''
def replaced_token_loss(disc_logits, corrupted, original):
    return F.binary_cross_entropy_with_logits(disc_logits, (corrupted != original).to(disc_logits.dtype))
''',
        "nn.BCELoss on the sigmoid": '''
def replaced_token_loss(disc_logits, corrupted, original):
    return nn.BCELoss()(torch.sigmoid(disc_logits), (corrupted != original).float())
''',
    },
    "ex6": {
        "the functional torch.optim.adamw.adamw (no optimizer object, so no step hook sees it)": EX6_HEADER + '''
        from torch.optim.adamw import adamw
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0), m=torch.zeros_like(p), v=torch.zeros_like(p))
            adamw(params, [p.grad for p in params], [self.state[p]["m"] for p in params],
                  [self.state[p]["v"] for p in params], [], [self.state[p]["step"] for p in params],
                  amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
''',
        "an inner torch.optim.AdamW per group": EX6_HEADER + '''
        for group in self.param_groups:
            if "inner" not in group:
                group["inner"] = torch.optim.AdamW(group["params"], lr=group["lr"], betas=group["betas"],
                                                   eps=group["eps"], weight_decay=group["weight_decay"])
            group["inner"].param_groups[0]["lr"] = group["lr"]
            group["inner"].step()
''',
    },
    "ex7": {
        "the course's scheduler (make_scheduler) and torch.nn.utils.clip_grad_norm_": '''
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    config = pretraining.TrainConfig(max_iters=decay_steps, warmup_iters=warmup_steps, learning_rate=max_lr,
                                     min_lr=min_lr)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=max_lr)
    scheduler = pretraining.make_scheduler(optimizer, config)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return float(optimizer.param_groups[0]["lr"])


def clip_grad_norm(parameters, max_norm):
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
''',
        "PyTorch's schedulers chained by hand, and get_total_norm + clip_grads_with_norm_": '''
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR


def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=max_lr)
    cosine = CosineAnnealingLR(optimizer, T_max=decay_steps - warmup_steps, eta_min=min_lr)
    stages = [cosine, ConstantLR(optimizer, factor=min_lr / max_lr, total_iters=10**12)]
    milestones = [decay_steps]
    if warmup_steps:
        stages.insert(0, LinearLR(optimizer, 1 / (warmup_steps + 1), 1.0, total_iters=warmup_steps))
        milestones.insert(0, warmup_steps)
    scheduler = SequentialLR(optimizer, stages, milestones)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return float(optimizer.param_groups[0]["lr"])


def clip_grad_norm(parameters, max_norm):
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return total
''',
    },
    "ex8": {
        "PyTorch's fused F.linear_cross_entropy, chunked by its options": '''
def chunked_cross_entropy(hidden, weight, targets, chunk_size):
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size)
    return F.linear_cross_entropy(hidden, weight, targets, options=options)
''',
        "F.cross_entropy on the full logits": FULL_LOGITS,
    },
    "ex9": {
        "transformers' TopKLogitsWarper / TopPLogitsWarper, and the course's utils.transformer.sample": '''
def filter_logits(logits, top_k=None, top_p=None):
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    out = logits.clone()
    if top_k is not None:
        out = TopKLogitsWarper(top_k)(None, out)
    if top_p is not None:
        out = TopPLogitsWarper(top_p)(None, out)
    return out


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    from utils.transformer import sample
    if top_p is None:
        return sample(logits, temperature, top_k, generator)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
''',
    },
}


SHORTCUTS["ex10"] = {
    "the course's own step and evaluation (pretraining.train_step, pretraining.evaluate)": '''
def train_step(model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm, clip_grad_norm):
    return pretraining.train_step(model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm,
                                  clip_grad_norm)


def evaluate(model, batches):
    return pretraining.evaluate(model, batches)
''',
    "PyTorch's clip_grad_norm_ instead of the function given, and pretraining.estimate_loss": '''
def train_step(model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm, clip_grad_norm):
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        loss = model(x, y)[1]
        (loss / grad_accum_steps).backward()
        total += loss.item()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total / grad_accum_steps


def evaluate(model, batches):
    pending = iter(batches)
    return pretraining.estimate_loss(model, {"batches": None}, lambda *args: next(pending), batch_size=0,
                                     block_size=0, iters=len(batches))["batches"]
''',
}


def test_every_exercise_has_a_shortcut_row():
    assert sorted(SHORTCUTS) == sorted(EXERCISES)


@pytest.mark.parametrize("exercise,name", [(e, n) for e, rows in SHORTCUTS.items() for n in rows])
def test_shortcut_scores_nothing(exercise, name):
    outcome = NB.run(exercise, SHORTCUTS[exercise][name])
    assert sum(outcome.earned.values()) == 0, (name, outcome.earned)


# ---------------------------------------------------------------------------------------------
# Values that lie about equality earn nothing (every comparison goes through checks.plain)
# ---------------------------------------------------------------------------------------------

LIARS = '''
class _Always(float):
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = float.__hash__
    def __sub__(self, other):
        return _Always(0.0)
    __rsub__ = __sub__
    def __abs__(self):
        return _Always(0.0)


class _AlwaysInt(int):
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
    __hash__ = int.__hash__


class _AlwaysList(list):
    def __eq__(self, other):
        return True
    __ne__ = lambda self, other: False
'''


def test_ex7_a_float_that_always_compares_equal_earns_nothing_on_the_schedule():
    clipping = "def clip_grad_norm" + NB.solution_source("ex7").split("def clip_grad_norm", 1)[1]
    source = LIARS + '''
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    return _Always(0.0)


''' + clipping
    outcome = NB.run("ex7", source)
    assert outcome.earned["ex7_test_schedule"] == 0
    assert outcome.earned["ex7_test_clipping"] == outcome.possible["ex7_test_clipping"]


def test_ex2_ids_that_always_compare_equal_earn_nothing_on_encoding():
    reference = NB.solution_source("ex2")
    decode = "def bpe_decode" + reference.split("def bpe_decode", 1)[1]
    for encode in ('''
def bpe_encode(text, alphabet, merges):
    return [_AlwaysInt(0) for _ in text]
''', '''
def bpe_encode(text, alphabet, merges):
    return _AlwaysList([0])
'''):
        outcome = NB.run("ex2", LIARS + encode + "\n\n" + decode)
        assert outcome.earned["ex2_test_encode"] == 0, encode


def test_ex1_merges_that_always_compare_equal_earn_nothing():
    source = LIARS + '''
def train_bpe(text, num_merges):
    return _AlwaysList([("a", "b")] * num_merges)
'''
    outcome = NB.run("ex1", source)
    assert sum(outcome.earned.values()) == 0, outcome.earned


SHORTCUTS["ex11"] = {
    "the course's own checkpoint functions (pretraining.save_training_state, load_training_state)": '''
def save_checkpoint(path, *, model, optimizer, scheduler, generator, step):
    pretraining.save_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                    generator=generator, step=step)


def load_checkpoint(path, *, model, optimizer, scheduler, generator):
    return pretraining.load_training_state(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                           generator=generator)
''',
}
