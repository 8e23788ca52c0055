"""Mutation tests of Phase 5's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
and each shortcut through the course's reference (utils.sft, utils.lora) or peft earns nothing
(SHORTCUTS, checked by tests/test_shortcuts_every_phase.py)."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/05_sft/sft.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5"]

check_correct = NB.assert_full_marks
check_wrong = NB.assert_loses_points


def test_phase_has_the_five_exercises_in_order():
    assert NB.exercises() == EXERCISES


# ---------------------------------------------------------------------------------------------
# Exercise 1: new tokens
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "torch.cat of the old rows and the repeated mean": '''
def add_tokens(model, new_vocab_size):
    old = model.transformer.wte.weight.detach()
    extra = old.mean(0, keepdim=True).repeat(new_vocab_size - old.shape[0], 1)
    model.transformer.wte = nn.Embedding.from_pretrained(torch.cat([old, extra]), freeze=False)
    model.lm_head = nn.Linear(old.shape[1], new_vocab_size, bias=False)
    model.lm_head.weight = model.transformer.wte.weight
    model.config.vocab_size = new_vocab_size
    return model
''',
    "a new Parameter assigned to both modules": '''
def add_tokens(model, new_vocab_size):
    w = model.transformer.wte.weight.data
    n, d = w.shape
    new = torch.empty(new_vocab_size, d, dtype=w.dtype, device=w.device)
    new[:n] = w
    new[n:] = w.sum(0) / n
    weight = nn.Parameter(new)
    emb = nn.Embedding(new_vocab_size, d)
    emb.weight = weight
    head = nn.Linear(d, new_vocab_size, bias=False)
    head.weight = weight
    model.transformer.wte, model.lm_head = emb, head
    model.config.vocab_size = new_vocab_size
    return model
''',
}

EX1_WRONG = {
    "the head copied, not tied": (("    model.lm_head.weight = wte.weight\n",
                                   "    model.lm_head.weight = nn.Parameter(wte.weight.detach().clone())\n"),
                                  "not tied"),
    "new rows left at nn.Embedding's random init": (("        wte.weight[n_old:] = old.mean(dim=0)\n", ""),
                                                    "new embedding rows"),
    "new rows at zero": (("wte.weight[n_old:] = old.mean(dim=0)", "wte.weight[n_old:] = 0.0"), "zeros"),
    "the mean over the wrong axis": (("old.mean(dim=0)", "old.mean(dim=1, keepdim=True)"), None),
    "config not updated": (("    model.config.vocab_size = new_vocab_size\n", ""), "vocab_size"),
    "head not replaced": (("    model.lm_head = nn.Linear(n_embd, new_vocab_size, bias=False, device=old.device, dtype=old.dtype)\n"
                           "    model.lm_head.weight = wte.weight\n", ""), None),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    check_correct("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    (old, new), message = EX1_WRONG[name]
    check_wrong("ex1", mutate("ex1", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 2: the chat template and the loss mask
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "encode the whole text, then find the replies by scanning the ids": '''
def format_chat(messages, add_generation_prompt=False):
    parts = [f"<|{m['role']}|>{m['content']}<|end|>" for m in messages]
    return "".join(parts) + ("<|assistant|>" if add_generation_prompt else "")


def tokenize_chat(tokenizer, messages, block_size):
    ids = tokenizer.encode(format_chat(messages))
    flags, inside = [], False
    for token in ids:
        if token == tokenizer.assistant_id:
            flags.append(False)
            inside = True
        elif token == tokenizer.user_id:
            flags.append(False)
            inside = False
        else:
            flags.append(inside)
            if token == tokenizer.end_id:
                inside = False
    ids, flags = ids[:block_size + 1], flags[:block_size + 1]
    input_ids = torch.tensor(ids[:-1], dtype=torch.long)
    labels = torch.tensor([t if f else IGNORE_INDEX for t, f in zip(ids[1:], flags[1:])], dtype=torch.long)
    return input_ids, labels, labels != IGNORE_INDEX
''',
    "numpy-free list building with masked_fill": '''
def format_chat(messages, add_generation_prompt=False):
    out = []
    for m in messages:
        out.append({"user": "<|user|>", "assistant": "<|assistant|>"}[m["role"]])
        out.append(m["content"])
        out.append("<|end|>")
    if add_generation_prompt:
        out.append("<|assistant|>")
    return "".join(out)


def tokenize_chat(tokenizer, messages, block_size):
    seq, keep = [], []
    for m in messages:
        head = [tokenizer.user_id if m["role"] == "user" else tokenizer.assistant_id]
        body = tokenizer.encode(m["content"]) + [tokenizer.end_id]
        seq.extend(head + body)
        keep.extend([0] * len(head) + [int(m["role"] == "assistant")] * len(body))
    s = torch.tensor(seq[:block_size + 1])
    k = torch.tensor(keep[:block_size + 1]).bool()
    labels = s[1:].clone().masked_fill(~k[1:], IGNORE_INDEX)
    return s[:-1].clone(), labels, k[1:].clone()
''',
}

EX2_WRONG = {
    "-100 as the ignore index": (("torch.full_like(tokens[1:], IGNORE_INDEX)", "torch.full_like(tokens[1:], -100)"), "-100"),
    "the assistant marker trained": (("[False] * len(marker) + [message[\"role\"] == \"assistant\"] * len(body)",
                                      "[message[\"role\"] == \"assistant\"] * (len(marker) + len(body))"), "marker"),
    "the closing <|end|> not trained": (("body = tokenizer.encode(message[\"content\"] + \"<|end|>\")\n        ids += marker + body\n"
                                         "        in_reply += [False] * len(marker) + [message[\"role\"] == \"assistant\"] * len(body)",
                                         "body = tokenizer.encode(message[\"content\"])\n        ids += marker + body + [tokenizer.end_id]\n"
                                         "        in_reply += [False] * len(marker) + [message[\"role\"] == \"assistant\"] * len(body) + [False]"),
                                        "stop"),
    "mask not shifted with the labels": (("response_mask = torch.tensor(in_reply[1:], dtype=torch.bool)",
                                          "response_mask = torch.tensor(in_reply[:-1], dtype=torch.bool)"), None),
    "truncated after shifting (block_size + 1 inputs)": (("    ids, in_reply = ids[:block_size + 1], in_reply[:block_size + 1]\n",
                                                          "    ids, in_reply = ids[:block_size + 2], in_reply[:block_size + 2]\n"),
                                                         "block_size"),
    "no truncation": (("    ids, in_reply = ids[:block_size + 1], in_reply[:block_size + 1]\n", ""), "block_size"),
    "every label kept (no mask)": (("labels = torch.where(response_mask, tokens[1:], torch.full_like(tokens[1:], IGNORE_INDEX))",
                                    "labels = tokens[1:].clone()"), None),
    "a newline between messages": (("        text += ROLE_TOKENS[message[\"role\"]] + message[\"content\"] + \"<|end|>\"\n",
                                    "        text += ROLE_TOKENS[message[\"role\"]] + message[\"content\"] + \"<|end|>\\n\"\n"),
                                   "nothing in between"),
    "generation prompt forgotten": (("        text += \"<|assistant|>\"\n", "        pass\n"), "add_generation_prompt"),
}


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_alternatives_get_full_marks(name):
    check_correct("ex2", EX2_CORRECT[name])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    (old, new), message = EX2_WRONG[name]
    check_wrong("ex2", mutate("ex2", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 3: packing
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "one pass, building the mask from example ids": '''
def pack_examples(examples, block_size, pad_id):
    rows = [[]]
    for x, y in examples:
        if sum(len(e[0]) for e in rows[-1]) + len(x) > block_size:
            rows.append([])
        rows[-1].append((x, y))
    out_ids, out_labels, out_pos, out_mask = [], [], [], []
    for row in rows:
        ids = torch.cat([x for x, _ in row])
        lab = torch.cat([y for _, y in row])
        pos = torch.cat([torch.arange(len(x)) for x, _ in row])
        seg = torch.cat([torch.full((len(x),), k) for k, (x, _) in enumerate(row)])
        pad = block_size - len(ids)
        ids = torch.cat([ids, torch.full((pad,), pad_id)])
        lab = torch.cat([lab, torch.full((pad,), IGNORE_INDEX)])
        pos = torch.cat([pos, torch.zeros(pad, dtype=torch.long)])
        seg = torch.cat([seg, -1 - torch.arange(pad)])           # each pad its own segment
        causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
        out_ids.append(ids); out_labels.append(lab); out_pos.append(pos)
        out_mask.append(causal & (seg[:, None] == seg[None, :]))
    return (torch.stack(out_ids).long(), torch.stack(out_labels).long(), torch.stack(out_pos).long(),
            torch.stack(out_mask))
''',
}

EX3_WRONG = {
    "one causal triangle per row": (("    attn_mask = torch.eye(block_size, dtype=torch.bool).repeat(R, 1, 1)\n",
                                     "    attn_mask = torch.ones(block_size, block_size, dtype=torch.bool).tril().repeat(R, 1, 1)\n"),
                                    "block-diagonal"),
    "positions continue across examples": (("position_ids[r, start:start + n] = torch.arange(n)",
                                            "position_ids[r, start:start + n] = torch.arange(start, start + n)"), "restart"),
    "padding attends to nothing": (("torch.eye(block_size, dtype=torch.bool).repeat(R, 1, 1)",
                                    "torch.zeros(R, block_size, block_size, dtype=torch.bool)"), None),
    "blocks without the causal triangle": (("torch.ones(n, n, dtype=torch.bool).tril()", "torch.ones(n, n, dtype=torch.bool)"), None),
    "an example that fills the row exactly starts a new one": (("        if used + len(x) > block_size:", "        if used + len(x) >= block_size:"), None),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    check_correct("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    (old, new), message = EX3_WRONG[name]
    check_wrong("ex3", mutate("ex3", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 4: the LoRA layer
# ---------------------------------------------------------------------------------------------

EX4_CORRECT = {
    "F.linear twice, merge through a helper": '''
class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        base.weight.requires_grad = False
        if base.bias is not None:
            base.bias.requires_grad = False
        self.lora_A = nn.Parameter(base.weight.new_empty(r, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.merged = False

    def _delta(self):
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        y = F.linear(x, self.base.weight, self.base.bias)
        if not self.merged:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return y

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self.base.weight.data += self._delta()
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.base.weight.data -= self._delta()
        self.merged = False
''',
}

EX4_WRONG = {
    "no alpha / r scaling": (("        return out + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)",
                              "        return out + (x @ self.lora_A.T) @ self.lora_B.T"), "no alpha / r scaling"),
    "r / alpha": (("        self.scaling = alpha / r", "        self.scaling = r / alpha"), None),
    "B random, A zero": (("        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))\n        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))",
                          "        nn.init.zeros_(self.lora_A)\n        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, device=w.device, dtype=w.dtype))"),
                         None),
    "base not frozen": (("        for p in base.parameters():\n            p.requires_grad_(False)\n", ""), "freeze"),
    "adapter path still added after merge": (("        if self.merged:\n            return out\n", ""), "twice"),
    "merge without the scaling": (("                self.base.weight += self.scaling * self.lora_B @ self.lora_A",
                                   "                self.base.weight += self.lora_B @ self.lora_A"), "without alpha / r"),
    "merge applied again when already merged": (("        if not self.merged:\n            with torch.no_grad():\n                self.base.weight +=",
                                                 "        if True:\n            with torch.no_grad():\n                self.base.weight +="), None),
    "A initialised with randn": (("        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))\n",
                                  "        nn.init.normal_(self.lora_A)\n"), "kaiming"),
}


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_alternatives_get_full_marks(name):
    check_correct("ex4", EX4_CORRECT[name])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    (old, new), message = EX4_WRONG[name]
    check_wrong("ex4", mutate("ex4", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 5: add_lora
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "recursion over named_children": '''
def add_lora(model, targets, make_adapter):
    def visit(module):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(module, name, make_adapter(child))
            else:
                visit(child)
    visit(model)
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1].startswith("lora_")
    return model
''',
}

EX5_WRONG = {
    "everything left trainable": (("        p.requires_grad_(name.split(\".\")[-1].startswith(\"lora_\"))",
                                   "        p.requires_grad_(True)"), "freeze everything else"),
    "matched on the full dotted name": (("name.split(\".\")[-1] in targets]", "name in targets]"), None),
    "any module type wrapped": (("if isinstance(module, nn.Linear) and name.split", "if name.split"), None),
    "'lora' anywhere in the name": (("name.split(\".\")[-1].startswith(\"lora_\")", "\"c_attn\" in name"), None),
}


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    check_correct("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message = EX5_WRONG[name]
    check_wrong("ex5", mutate("ex5", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Shortcuts: the course's references and peft earn nothing
# ---------------------------------------------------------------------------------------------

SHORTCUTS = {
    "ex1": {
        "the course's resize_token_embeddings": """
def add_tokens(model, new_vocab_size):
    return sft.resize_token_embeddings(model, new_vocab_size)
""",
    },
    "ex2": {
        "the course's format_chat and tokenize_chat": """
def format_chat(messages, add_generation_prompt=False):
    return sft.format_chat(messages, add_generation_prompt)


def tokenize_chat(tokenizer, messages, block_size):
    return sft.tokenize_chat(tokenizer, messages, block_size)
""",
        "saved references to the course's functions": """
_fc, _tc = sft.format_chat, sft.tokenize_chat


def format_chat(messages, add_generation_prompt=False):
    return _fc(messages, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tokenizer, messages, block_size):
    return _tc(tokenizer, messages, block_size)
""",
    },
    "ex3": {
        "the course's pack_examples": """
def pack_examples(examples, block_size, pad_id):
    return sft.pack_examples(examples, block_size, pad_id)
""",
    },
    "ex4": {
        "a subclass of the course's LoRALinear": """
class LoRALinear(lora.LoRALinear):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
""",
        "peft's LoRA layer": """
from peft.tuners.lora import Linear as _PeftLinear


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        self.inner = _PeftLinear(base, "default", r=r, lora_alpha=alpha)
        self.scaling = alpha / r
        self.merged = False

    @property
    def lora_A(self):
        return self.inner.lora_A["default"].weight

    @property
    def lora_B(self):
        return self.inner.lora_B["default"].weight

    def forward(self, x):
        return self.inner(x)

    def merge(self):
        self.inner.merge()
        self.merged = True

    def unmerge(self):
        self.inner.unmerge()
        self.merged = False
""",
    },
    "ex5": {
        "the course's add_lora machinery": """
def add_lora(model, targets, make_adapter):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make_adapter(module))
    return lora.mark_only_lora_trainable(model)
""",
    },
}
