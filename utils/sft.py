"""Phase 5 helpers: chat data, a chat tokenizer, fine-tuning and evaluation, and the shipped SFT model.

Reference versions of what the Phase 5 exercises build live here, so that Phases 6 and 8 never
depend on a student's answer (the graded tests switch them off). LoRA is in ``utils.lora``.

Public API (Phases 6 and 8 rely on it; it stays stable):

* special tokens and the tokenizer: ``SPECIAL_TOKENS`` (``USER``, ``ASSISTANT``, ``END``, ``PAD``),
  ``IGNORE_INDEX`` (-1, the ignore index of the course GPT's loss), ``ChatTokenizer`` (the Phase 3
  ``CharTokenizer`` plus one id per special token: ``.user_id``, ``.assistant_id``, ``.end_id``,
  ``.pad_id``; ``encode`` reads special tokens written in the text)
* the chat template: ``format_chat(messages, add_generation_prompt=False)``,
  ``tokenize_chat(tokenizer, messages, block_size, train_on_prompt=False)`` ->
  ``(input_ids, labels, response_mask)``
* the task data: ``FAMILIES`` (name -> ``TaskFamily``), ``HELD_OUT_FAMILY``, ``Example``
  (``.family``, ``.prompt``, ``.answer``, ``.messages()``), ``task_splits(...)`` -> ``TaskSplits``
  (``train``, ``test``, ``held_out``; split by instance, one family held out),
  ``check_answer(example, response)`` (exact match), ``corpus_lines``
* new tokens: ``resize_token_embeddings(model, new_vocab_size)``
* batches: ``pad_batch``, ``pack_examples``, ``forward_packed`` (the course GPT with an attention mask
  and position ids), ``sequence_loss``
* fine-tuning: ``SFTConfig``, ``sft_train(model, tokenizer, examples, config, ...)`` (gradient
  accumulation, token-weighted loss, optional mixing of pretraining text), ``SFTResult``
* generation and evaluation: ``generate(model, tokenizer, prompt, ...)``, ``generate_batch``,
  ``evaluate(model, tokenizer, examples)`` (exact match per family), ``reply_loss``,
  ``corpus_perplexity``, ``pretraining_ids``
* prompt tuning (the optional exercise's reference): ``SoftPrompt(model, init_ids)``,
  ``train_soft_prompt``, ``soft_prompt_replies``
* Self-Instruct at this scale: ``self_instruct_round``
* figures and widgets: ``accuracy_figure``, ``chat_widget``
* the shipped model: ``load_sft_model()`` (``utils/checkpoints/sft_char.pt``, made by
  ``scripts/make_sft_checkpoint.py`` through ``make_sft_checkpoint``), ``base_chat_model()`` (the
  Phase 3 model with the chat tokens added, before any fine-tuning)
"""

from __future__ import annotations

import difflib
import html
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots, pretraining, runtime
from .pretraining import CharTokenizer
from .transformer import GPT, GPTConfig

# ---------------------------------------------------------------------------
# Special tokens and the chat tokenizer
# ---------------------------------------------------------------------------

USER, ASSISTANT, END, PAD = "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = (USER, ASSISTANT, END, PAD)
ROLES = {"user": USER, "assistant": ASSISTANT}
# The course GPT's loss (nanoGPT's convention) ignores targets equal to -1. Hugging Face uses -100.
IGNORE_INDEX = -1


class ChatTokenizer(CharTokenizer):
    """The Phase 3 character tokenizer with the chat's special tokens appended.

    The first ``len(base.chars)`` ids are exactly the character tokenizer's (so the pretrained
    model's embedding rows keep their meaning); each special token gets one new id after them.
    ``encode`` turns a special token written in the text (``"<|end|>"``) into its single id.
    """

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = SPECIAL_TOKENS):
        chars = [c for c in chars if c not in special_tokens]
        super().__init__(list(chars) + list(special_tokens))
        self.special_tokens = tuple(special_tokens)
        self.n_chars = len(chars)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in special_tokens) + ")")

    @classmethod
    def from_char_tokenizer(cls, base: CharTokenizer) -> "ChatTokenizer":
        return cls(base.chars)

    user_id = property(lambda self: self.index[USER])
    assistant_id = property(lambda self: self.index[ASSISTANT])
    end_id = property(lambda self: self.index[END])
    pad_id = property(lambda self: self.index[PAD])

    def encode(self, text: str, errors: str = "strict", replacement: str = " ") -> list[int]:
        ids = []
        for piece in self._split.split(text):
            if piece in self.index and piece in self.special_tokens:
                ids.append(self.index[piece])
            elif piece:
                ids.extend(super().encode(piece, errors, replacement))
        return ids

    def to_dict(self) -> dict:
        return {"kind": "chat", "chars": self.chars[:self.n_chars], "special_tokens": list(self.special_tokens)}

    @classmethod
    def from_dict(cls, state: dict) -> "ChatTokenizer":
        return cls(state["chars"], state.get("special_tokens", SPECIAL_TOKENS))


# ---------------------------------------------------------------------------
# The chat template
# ---------------------------------------------------------------------------


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """``[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]`` ->
    ``"<|user|>Hi<|end|><|assistant|>Hello<|end|>"``; ``add_generation_prompt`` appends
    ``"<|assistant|>"`` so that the model writes the reply."""
    text = "".join(f"{ROLES[m['role']]}{m['content']}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def tokenize_chat(tokenizer: ChatTokenizer, messages: Sequence[dict], block_size: int,
                  train_on_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, response_mask)`` of one conversation, ready for ``model(input_ids, labels)``.

    The token ids ``s`` of ``format_chat(messages)`` are cut to their first ``block_size + 1``;
    ``input_ids = s[:-1]``, and ``labels[t]`` is the next token ``s[t + 1]`` where that token belongs
    to an assistant reply (its characters and its closing ``<|end|>``; not the ``<|assistant|>``
    marker, which the prompt supplies), ``IGNORE_INDEX`` elsewhere. ``response_mask`` (bool) is True
    exactly where a label is kept. ``train_on_prompt=True`` keeps every label (no loss mask).
    """
    ids, trained = [], []
    for m in messages:
        marker = tokenizer.encode(ROLES[m["role"]])
        body = tokenizer.encode(m["content"]) + [tokenizer.end_id]
        ids += marker + body
        trained += [False] * len(marker) + [m["role"] == "assistant"] * len(body)
    ids, trained = ids[:block_size + 1], trained[:block_size + 1]
    s = torch.tensor(ids, dtype=torch.long)
    mask = torch.tensor(trained[1:], dtype=torch.bool)
    if train_on_prompt:
        mask = torch.ones_like(mask)
    labels = torch.where(mask, s[1:], torch.full_like(s[1:], IGNORE_INDEX))
    return s[:-1], labels, mask


# ---------------------------------------------------------------------------
# Instruction data: task families with exact answers
# ---------------------------------------------------------------------------

_PUNCT = "!\"$&',-.:;?"


def _words(line: str) -> list[str]:
    return [w.strip(_PUNCT) for w in line.split() if w.strip(_PUNCT)]


@dataclass(frozen=True)
class TaskFamily:
    """A kind of instruction: ``template.format(x=...)`` is the user's message, ``solve(x)`` the answer."""

    name: str
    template: str
    solve: Callable[[str], str]
    kind: str = "line"          # what x is: a corpus "line", a "word", or a "sum"
    description: str = ""

    def prompt(self, x: str) -> str:
        return self.template.format(x=x)

    def parse(self, prompt: str) -> str | None:
        """The input ``x`` of a prompt written with this family's template, or None."""
        head, _, tail = self.template.partition("{x}")
        if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) > len(head) + len(tail):
            return prompt[len(head):len(prompt) - len(tail)] if tail else prompt[len(head):]
        return None


def _add(x: str) -> str:
    a, b = x.split(" and ")
    return str(int(a) + int(b))


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in [
    TaskFamily("repeat", "Repeat: {x}", lambda x: x, description="copy the line"),
    TaskFamily("upper", "Upper case: {x}", str.upper, description="the line in capitals"),
    TaskFamily("first_word", "First word: {x}", lambda x: _words(x)[0], description="first word, no punctuation"),
    TaskFamily("last_word", "Last word: {x}", lambda x: _words(x)[-1], description="last word, no punctuation"),
    TaskFamily("count_words", "Count the words: {x}", lambda x: str(len(x.split())),
               description="number of space-separated words"),
    TaskFamily("reverse", "Reverse: {x}", lambda x: x[::-1], kind="word", description="a word spelled backwards"),
    TaskFamily("add", "Add {x}", _add, kind="sum", description="the sum of two numbers below 50"),
    TaskFamily("lower", "Lower case: {x}", str.lower, description="the line in small letters (held out)"),
]}
HELD_OUT_FAMILY = "lower"   # never trained on: does instruction tuning transfer to a new instruction?


@dataclass(frozen=True)
class Example:
    """One instruction and its exact answer."""

    family: str
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict]:
        user = [{"role": "user", "content": self.prompt}]
        return user + ([{"role": "assistant", "content": self.answer}] if with_answer else [])


def check_answer(example: Example, response: str) -> bool:
    """Exact match: the reply (surrounding whitespace ignored) equals the example's answer."""
    return response.strip() == example.answer.strip()


@dataclass
class TaskSplits:
    """Instances split so that no corpus line (or word, or sum) of ``test`` appears in ``train``;
    ``held_out`` holds the one family that is never trained on."""

    train: list[Example]
    test: list[Example]
    held_out: list[Example]

    def summary(self) -> str:
        counts = {}
        for ex in self.train:
            counts[ex.family] = counts.get(ex.family, 0) + 1
        return (f"{len(self.train)} training examples ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
                f"{len(self.test)} test, {len(self.held_out)} of the held-out family '{HELD_OUT_FAMILY}'")


def corpus_lines(min_len: int = 12, max_len: int = 36) -> list[str]:
    """Distinct spoken lines of the Phase 3 corpus's *training* part (the validation part stays unseen,
    so the forgetting measurement is fair), between ``min_len`` and ``max_len`` characters."""
    text = pretraining.shakespeare_text()
    train_text = text[:int(len(text) * 0.9)]          # the same cut as pretraining.train_val_split
    seen, out = set(), []
    for line in train_text.split("\n"):
        line = line.strip()
        if (min_len <= len(line) <= max_len and not line.endswith(":") and len(line.split()) >= 2
                and line not in seen):
            seen.add(line)
            out.append(line)
    return out


def task_splits(n_train: int = 1500, n_test: int = 100, seed: int = 0,
                families: Iterable[str] | None = None, held_out: str = HELD_OUT_FAMILY,
                max_len: int = 24) -> TaskSplits:
    """``n_train`` training and ``n_test`` test instances of every family except ``held_out``, and
    ``n_test`` instances of ``held_out``. Lines (10 to ``max_len`` characters), words and sums are
    split into disjoint pools first (by instance), so a test instance's input never occurs in
    training under any family."""
    rng = random.Random(seed)
    lines = corpus_lines(10, max_len)
    rng.shuffle(lines)
    words = sorted({w for line in lines for w in _words(line) if 3 <= len(w) <= 7 and w.isalpha()})
    rng.shuffle(words)
    sums = [f"{a} and {b}" for a in range(50) for b in range(50)]
    rng.shuffle(sums)
    pools = {}
    for kind, items in (("line", lines), ("word", words), ("sum", sums)):
        cut = max(len(items) // 5, 1)
        pools[kind] = {"test": items[:cut], "train": items[cut:]}
    names = list(families) if families is not None else [n for n in FAMILIES if n != held_out]

    def draw(family: TaskFamily, split: str, n: int) -> list[Example]:
        pool = pools[family.kind][split]
        picks = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
        return [Example(family.name, family.prompt(x), family.solve(x)) for x in picks]

    train = [ex for name in names for ex in draw(FAMILIES[name], "train", n_train)]
    rng.shuffle(train)
    test = [ex for name in names for ex in draw(FAMILIES[name], "test", n_test)]
    held = draw(FAMILIES[held_out], "test", n_test) if held_out else []
    return TaskSplits(train, test, held)


# ---------------------------------------------------------------------------
# New tokens: a bigger embedding, old logits unchanged
# ---------------------------------------------------------------------------


def resize_token_embeddings(model: GPT, new_vocab_size: int) -> GPT:
    """Give a course GPT ``new_vocab_size`` token ids, in place: rows of the old embedding are kept,
    new rows start at the mean of the old ones (Hewitt 2021: the new tokens start as likely as an
    average token, not at random), and the output head stays tied to the embedding."""
    old = model.transformer.wte.weight
    n_old = old.shape[0]
    if new_vocab_size < n_old:
        raise ValueError("the vocabulary can only grow")
    wte = nn.Embedding(new_vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():   # not the decorator: see LoRALinear.merge in utils.lora
        wte.weight[:n_old] = old
        wte.weight[n_old:] = old.mean(0)
    model.transformer.wte = wte
    model.lm_head = nn.Linear(old.shape[1], new_vocab_size, bias=False, device=old.device, dtype=old.dtype)
    model.lm_head.weight = wte.weight
    model.config.vocab_size = new_vocab_size
    return model


def base_chat_model(device=None) -> tuple[GPT, ChatTokenizer]:
    """The Phase 3 pretrained model with the chat tokens added (before any fine-tuning)."""
    model, char_tok = pretraining.load_pretrained(device="cpu")
    tokenizer = ChatTokenizer.from_char_tokenizer(char_tok)
    resize_token_embeddings(model, tokenizer.vocab_size)
    return model.to(device or runtime.get_device()).eval(), tokenizer


# ---------------------------------------------------------------------------
# Batches: padding and packing
# ---------------------------------------------------------------------------


def pad_batch(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs to the longest: inputs with ``pad_id``, labels with
    ``IGNORE_INDEX``. Causal attention never lets a real token see the padding after it."""
    length = max(len(x) for x, _ in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        inputs[i, :len(x)], labels[i, :len(y)] = x, y
    return inputs, labels


def pack_examples(examples: Sequence[tuple[torch.Tensor, torch.Tensor]], block_size: int, pad_id: int):
    """Pack ``(input_ids, labels)`` pairs into rows of ``block_size`` tokens, in order: an example goes
    into the current row if it fits, else it starts a new row; the end of each row is padding.

    Returns ``(input_ids, labels, position_ids, attn_mask)``: (R, block_size) long tensors and a
    (R, block_size, block_size) bool mask, True where query i may attend to key j: same example and
    j <= i. Positions restart at 0 for each example. A padding position has input ``pad_id``, label
    ``IGNORE_INDEX``, position 0, and attends only to itself.
    """
    rows, current, used = [], [], 0
    for x, y in examples:
        if len(x) > block_size:
            raise ValueError(f"an example of {len(x)} tokens does not fit in block_size={block_size}")
        if used + len(x) > block_size:
            rows.append(current)
            current, used = [], 0
        current.append((x, y))
        used += len(x)
    if current:
        rows.append(current)
    R = len(rows)
    inputs = torch.full((R, block_size), pad_id, dtype=torch.long)
    labels = torch.full((R, block_size), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((R, block_size), dtype=torch.long)
    mask = torch.eye(block_size, dtype=torch.bool).repeat(R, 1, 1)
    for r, row in enumerate(rows):
        start = 0
        for x, y in row:
            n = len(x)
            inputs[r, start:start + n], labels[r, start:start + n] = x, y
            positions[r, start:start + n] = torch.arange(n)
            mask[r, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
    return inputs, labels, positions, mask


def _attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def forward_packed(model: GPT, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                   attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of a course GPT with explicit position ids (B, T) and a boolean attention mask
    (B, T, T), True = may attend. Without them it equals ``model(input_ids)[0]``. (The course GPT's
    own forward has neither: it always uses positions 0..T-1 and one causal triangle.)"""
    T = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    tr = model.transformer
    x = tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))
    for block in tr.h:
        x = x + _attention(block.attn, block.ln_1(x), attn_mask)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x))


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the labelled positions (``IGNORE_INDEX`` skipped): their mean, or their sum."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


# ---------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------


@dataclass
class SFTConfig:
    """A fine-tuning run. ``batch_size`` examples per micro-batch, ``accumulation`` micro-batches per
    optimizer step; ``mix`` is the share of each micro-batch's rows that are windows of pretraining
    text (0: none), which limits forgetting."""

    steps: int = 300
    batch_size: int = 16
    accumulation: int = 2
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mix: float = 0.0
    train_on_prompt: bool = False
    seed: int = 0


@dataclass
class SFTResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0          # tokens fed through the model (padding included)
    trained_tokens: int = 0  # tokens that carried a loss

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def sft_train(model: GPT, tokenizer: ChatTokenizer, examples: Sequence[Example], config: SFTConfig, *,
              pretrain_ids: torch.Tensor | None = None, show_progress: bool = True,
              callback: Callable[[int, float], None] | None = None) -> SFTResult:
    """Supervised fine-tuning of ``model`` (every parameter with ``requires_grad``; LoRA leaves only
    the adapters) on ``examples``.

    Each optimizer step sums the token losses of ``accumulation`` micro-batches and divides by the
    number of labelled tokens in all of them, so that the step equals one big batch's mean loss per
    token (dividing each micro-batch by its own count would weight short replies more). AdamW,
    linear warmup then cosine decay, clipping. With ``config.mix > 0``, that share of each
    micro-batch's rows are random windows of ``pretrain_ids`` with every next character labelled.
    """
    device = next(model.parameters()).device
    block = model.config.block_size
    data = [tokenize_chat(tokenizer, ex.messages(), block, config.train_on_prompt)[:2] for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    total = max(1, config.steps)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.learning_rate * (step + 1) / (config.warmup + 1)
        progress = (step - config.warmup) / max(1, total - config.warmup)
        return config.min_lr + 0.5 * (config.learning_rate - config.min_lr) * (1 + math.cos(math.pi * progress))

    g = torch.Generator().manual_seed(config.seed)
    n_mix = int(round(config.mix * config.batch_size)) if pretrain_ids is not None else 0
    result = SFTResult()
    model.train()
    start = time.perf_counter()
    bar = runtime.progress(range(config.steps), desc="fine-tuning",
                           disable=not show_progress or runtime.is_grading())
    for step in bar:
        micro = []
        for _ in range(config.accumulation):
            picks = torch.randint(len(data), (config.batch_size - n_mix,), generator=g).tolist()
            x, y = pad_batch([data[i] for i in picks], tokenizer.pad_id)
            if n_mix:
                T = x.shape[1]
                starts = torch.randint(len(pretrain_ids) - T - 1, (n_mix,), generator=g)
                px = torch.stack([pretrain_ids[s:s + T] for s in starts.tolist()])
                py = torch.stack([pretrain_ids[s + 1:s + T + 1] for s in starts.tolist()])
                x, y = torch.cat([x, px]), torch.cat([y, py])
            micro.append((x.to(device), y.to(device)))
        n_labelled = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for x, y in micro:
            logits, _ = model(x)
            loss = sequence_loss(logits, y, reduction="sum") / max(1, n_labelled)
            loss.backward()
            step_loss += loss.item()
            result.tokens += x.numel()
        result.trained_tokens += n_labelled
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        result.losses.append(step_loss)
        if callback is not None:
            callback(step, step_loss)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


# ---------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------


def _as_prompt_text(prompt) -> str:
    if isinstance(prompt, Example):
        return format_chat(prompt.messages(with_answer=False), add_generation_prompt=True)
    if isinstance(prompt, str):
        return format_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return format_chat(prompt, add_generation_prompt=True)


def _step(model: GPT, idx: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor, cache: list) -> torch.Tensor:
    """One incremental forward of a course GPT over new tokens ``idx`` (B, T) at positions ``pos``
    (B, T). ``cache`` holds each layer's keys and values so far; ``key_valid`` (B, S) marks the
    cached-plus-new keys that are real (not left padding)."""
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(pos)
    B, T, C = x.shape
    S = key_valid.shape[1]
    causal = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(diagonal=S - T)
    mask = (causal[None] & key_valid[:, None, :])[:, None]
    for layer, block in enumerate(tr.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
        if cache[layer] is not None:
            k, v = torch.cat([cache[layer][0], k], 2), torch.cat([cache[layer][1], v], 2)
        cache[layer] = (k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x[:, -1:]))[:, -1]


@torch.no_grad()
def generate_batch(model: GPT, tokenizer: ChatTokenizer, prompts: Sequence, max_new_tokens: int = 48, *,
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 128) -> list[str]:
    """The model's replies to ``prompts`` (each a user message string, a list of messages, or an
    ``Example``): the chat template, ``<|assistant|>``, then tokens until ``<|end|>``. Greedy by
    default. Prompts are left-padded into batches (masked, positions counted from each prompt's
    first token) and decoded with a KV cache; the reply stops at ``block_size`` tokens in all."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    encoded = [tokenizer.encode(_as_prompt_text(p), errors="replace")[-(block - 1):] for p in prompts]
    replies: list[str] = [""] * len(prompts)
    g = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))   # similar lengths pad less
    for chunk in range(0, len(order), batch_size):
        rows = order[chunk:chunk + batch_size]
        L = max(len(encoded[i]) for i in rows)
        pads = torch.tensor([L - len(encoded[i]) for i in rows], device=device)
        idx = torch.tensor([[tokenizer.pad_id] * (L - len(encoded[i])) + encoded[i] for i in rows], device=device)
        pos = (torch.arange(L, device=device)[None] - pads[:, None]).clamp(min=0)
        valid = torch.arange(L, device=device)[None] >= pads[:, None]
        cache: list = [None] * model.config.n_layer
        logits = _step(model, idx, pos, valid, cache)
        out, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.float().argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1, generator=g)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, tokenizer.end_id), nxt)
            out.append(nxt)
            done |= nxt == tokenizer.end_id
            if bool(done.all()) or int(pos[:, -1].max()) + 1 >= block - 1:
                break
            pos = pos[:, -1:] + 1
            valid = torch.cat([valid, torch.ones(len(rows), 1, dtype=torch.bool, device=device)], 1)
            logits = _step(model, nxt[:, None], pos, valid, cache)
        generated = torch.stack(out, 1).tolist() if out else [[] for _ in rows]
        for r, i in enumerate(rows):
            ids = generated[r]
            if tokenizer.end_id in ids:
                ids = ids[:ids.index(tokenizer.end_id)]
            replies[i] = tokenizer.decode(ids)
    model.train(was_training)
    return replies


def generate(model: GPT, tokenizer: ChatTokenizer, prompt, max_new_tokens: int = 64, *,
             temperature: float = 0.0, seed: int = 0) -> str:
    """The model's reply to one prompt (a user message, a list of messages, or an ``Example``)."""
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, temperature=temperature, seed=seed)[0]


def evaluate(model: GPT, tokenizer: ChatTokenizer, examples: Sequence[Example],
             max_new_tokens: int = 48) -> dict[str, float]:
    """Exact-match accuracy per family (greedy replies), in the order the families first appear."""
    replies = generate_batch(model, tokenizer, examples, max_new_tokens)
    hits: dict[str, list[bool]] = {}
    for ex, reply in zip(examples, replies):
        hits.setdefault(ex.family, []).append(check_answer(ex, reply))
    return {family: sum(h) / len(h) for family, h in hits.items()}


@torch.no_grad()
def reply_loss(model: GPT, tokenizer: ChatTokenizer, examples: Sequence[Example], batch_size: int = 64) -> float:
    """Mean cross-entropy of the reply tokens (teacher forcing, loss mask on): a quick score of how
    well the model predicts the answers, without generating."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    data = [tokenize_chat(tokenizer, ex.messages(), model.config.block_size)[:2] for ex in examples]
    for start in range(0, len(data), batch_size):
        x, y = pad_batch(data[start:start + batch_size], tokenizer.pad_id)
        logits, _ = model(x.to(device))
        total += float(sequence_loss(logits, y.to(device), reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def corpus_perplexity(model: GPT, tokenizer: CharTokenizer | None = None, *, batches: int = 10,
                      batch_size: int = 16, block_size: int | None = None, seed: int = 0) -> float:
    """exp(mean cross-entropy) of ``model`` on fixed random windows of the *validation* part of the
    pretraining corpus: how much of its Shakespeare the model still knows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = _validation_ids()
    T = block_size or model.config.block_size
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(batches):
        starts = torch.randint(len(ids) - T - 1, (batch_size,), generator=g).tolist()
        x = torch.stack([ids[s:s + T] for s in starts]).to(device)
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts]).to(device)
        total += float(model(x, y)[1])
    model.train(was_training)
    return math.exp(total / batches)


_CACHE: dict[str, torch.Tensor] = {}


def pretraining_ids(split: str = "train") -> torch.Tensor:
    """The corpus as character ids (the same ids in ``ChatTokenizer``), ``"train"`` or ``"val"`` part."""
    if split not in _CACHE:
        text = pretraining.shakespeare_text()
        ids = torch.tensor(CharTokenizer.from_text(text).encode(text), dtype=torch.long)
        _CACHE["train"], _CACHE["val"] = pretraining.train_val_split(ids)
    return _CACHE[split]


def _validation_ids() -> torch.Tensor:
    return pretraining_ids("val")


# ---------------------------------------------------------------------------
# Prompt tuning (Lester et al. 2021): the optional exercise's reference
# ---------------------------------------------------------------------------


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al. 2021): ``len(init_ids)`` trainable vectors placed before the
    input embeddings of a frozen course GPT.

    ``self.prompt`` (P, n_embd) starts as the embedding rows of ``init_ids`` (Lester et al. found an
    initialisation from the vocabulary better than a random one); every parameter of ``model`` is
    frozen. ``forward(input_ids)`` (B, T) runs the model on the P vectors followed by the T token
    embeddings, positions 0 .. P + T - 1, and returns the logits (B, T, vocab) of the T real tokens.
    """

    def __init__(self, model: GPT, init_ids: Sequence[int]):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.prompt = nn.Parameter(model.transformer.wte.weight[list(init_ids)].detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tr = self.model.transformer
        B, T = input_ids.shape
        P = self.prompt.shape[0]
        if P + T > self.model.config.block_size:
            raise ValueError(f"{P} prompt vectors + {T} tokens exceed block_size={self.model.config.block_size}")
        x = torch.cat([self.prompt.expand(B, -1, -1), tr.wte(input_ids)], dim=1)
        x = tr.drop(x + tr.wpe(torch.arange(P + T, device=input_ids.device)))
        for block in tr.h:
            x = block(x)
        return self.model.lm_head(tr.ln_f(x[:, P:]))


def train_soft_prompt(soft: nn.Module, tokenizer: ChatTokenizer, examples: Sequence[Example], *, steps: int = 100,
                      batch_size: int = 16, learning_rate: float = 3e-2, seed: int = 0) -> SFTResult:
    """Train only the trainable parameters of ``soft`` (a ``SoftPrompt``, or anything whose forward
    maps ``input_ids`` (B, T) to logits (B, T, vocab) and whose ``.prompt`` is (P, n_embd)) on the
    replies of ``examples`` (loss mask on), AdamW at a constant rate, gradients clipped at 1."""
    block = soft.model.config.block_size - soft.prompt.shape[0]
    data = [tokenize_chat(tokenizer, ex.messages(), block)[:2] for ex in examples]
    params = [p for p in soft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    device = soft.prompt.device
    g = torch.Generator().manual_seed(seed)
    result = SFTResult()
    soft.train()
    start = time.perf_counter()
    for _ in range(steps):
        picks = torch.randint(len(data), (batch_size,), generator=g).tolist()
        x, y = pad_batch([data[i] for i in picks], tokenizer.pad_id)
        loss = sequence_loss(soft(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        result.losses.append(loss.item())
        result.tokens += x.numel()
        result.trained_tokens += int((y != IGNORE_INDEX).sum())
    result.seconds = time.perf_counter() - start
    soft.eval()
    return result


@torch.no_grad()
def soft_prompt_replies(soft: nn.Module, tokenizer: ChatTokenizer, examples: Sequence, max_new_tokens: int = 40) -> list[str]:
    """Greedy replies of ``soft`` (see ``train_soft_prompt``) to ``examples`` (prompts as for
    ``generate_batch``), one prompt at a time without a cache: short and plain, not fast."""
    was_training = soft.training
    soft.eval()
    device = soft.prompt.device
    room = soft.model.config.block_size - soft.prompt.shape[0]
    replies = []
    for example in examples:
        ids = tokenizer.encode(_as_prompt_text(example), errors="replace")[-(room - 1):]
        out = []
        while len(out) < max_new_tokens and len(ids) < room:
            nxt = int(soft(torch.tensor([ids], device=device))[0, -1].float().argmax())
            if nxt == tokenizer.end_id:
                break
            out.append(nxt)
            ids.append(nxt)
        replies.append(tokenizer.decode(out))
    soft.train(was_training)
    return replies


# ---------------------------------------------------------------------------
# Self-Instruct / Alpaca at this scale
# ---------------------------------------------------------------------------


def self_instruct_round(model: GPT, tokenizer: ChatTokenizer, known: Sequence[Example], n_samples: int = 40, *,
                        temperature: float = 1.0, seed: int = 0, similarity: float = 0.7) -> dict:
    """One round of Self-Instruct (Wang et al. 2023), the recipe behind Alpaca (Taori et al. 2023):
    the model writes new instructions, a filter keeps the useful ones, the model answers them.

    The model is shown ``<|user|>`` and samples an instruction. The filter keeps an instruction that
    (1) matches a known family's template with a valid input, (2) is not too similar to one already
    in the pool (difflib ratio below ``similarity``, standing in for the paper's ROUGE-L < 0.7), and
    (3) whose model answer passes the family's exact checker (our stand-in for quality control).
    Returns the samples, what each filter removed, and the new ``Example``s.
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    start = torch.tensor([[tokenizer.user_id]] * n_samples, device=device)
    out = model.generate(start, max_new_tokens=60, temperature=temperature, generator=g)
    samples = []
    for row in out[:, 1:].tolist():
        if tokenizer.end_id in row:
            row = row[:row.index(tokenizer.end_id)]
        samples.append(tokenizer.decode(row))
    pool = [ex.prompt for ex in known]
    removed = {"no known template": 0, "too similar": 0, "wrong answer": 0}
    candidates = []
    for text in samples:
        family = next((f for f in FAMILIES.values() if f.parse(text) is not None), None)
        try:
            answer = family.solve(family.parse(text)) if family else None
        except (ValueError, IndexError):
            answer = None
        if family is None or answer is None or any(t in text for t in SPECIAL_TOKENS):
            removed["no known template"] += 1
            continue
        if any(difflib.SequenceMatcher(None, text, p).ratio() >= similarity for p in pool[-2000:]):
            removed["too similar"] += 1
            continue
        pool.append(text)
        candidates.append(Example(family.name, text, answer))
    replies = generate_batch(model, tokenizer, candidates) if candidates else []
    kept = [ex for ex, reply in zip(candidates, replies) if check_answer(ex, reply)]
    removed["wrong answer"] = len(candidates) - len(kept)
    return {"samples": samples, "removed": removed, "kept": kept}


# ---------------------------------------------------------------------------
# Figures and widgets
# ---------------------------------------------------------------------------


def accuracy_figure(results: dict[str, dict[str, float]], title: str = "Exact match per task family",
                    held_out: str = HELD_OUT_FAMILY):
    """Grouped bars: one group per family, one bar per model (``{model: {family: accuracy}}``)."""
    import plotly.graph_objects as go

    families = list(dict.fromkeys(f for r in results.values() for f in r))
    labels = [f"{f} (held out)" if f == held_out else f for f in families]
    fig = go.Figure([go.Bar(name=name, x=labels, y=[100 * r.get(f, float("nan")) for f in families],
                            text=[f"{100 * r[f]:.0f}" if f in r else "" for f in families], textposition="outside")
                     for name, r in results.items()])
    fig.update_layout(barmode="group", yaxis_title="exact match (%)", yaxis_range=[0, 110])
    return plots.style(fig, title, 380)


def chat_widget(models: dict[str, GPT], tokenizer: ChatTokenizer,
                examples: Sequence[str] = ("Upper case: Good morrow, my lord.", "First word: Where is the king?",
                                           "Add 12 and 7", "Lower case: O ROMEO, ROMEO!")):
    """Type an instruction, see every model's greedy reply side by side."""
    import ipywidgets as widgets

    box = widgets.Text(value=examples[0], description="you:", layout=widgets.Layout(width="70%"))
    picks = widgets.Dropdown(options=list(examples), description="examples:")
    button = widgets.Button(description="ask", button_style="primary")
    table = widgets.HTML()

    def ask(_=None):
        rows = []
        for name, model in models.items():
            reply = generate(model, tokenizer, box.value, max_new_tokens=60)
            rows.append(f"<tr><td style='padding:4px 12px'><b>{html.escape(name)}</b></td>"
                        f"<td style='font-family:monospace;padding:4px 12px'>{html.escape(reply) or '<i>(empty)</i>'}"
                        "</td></tr>")
        table.value = "<table>" + "".join(rows) + "</table>"

    picks.observe(lambda change: (setattr(box, "value", change["new"]), ask()), names="value")
    button.on_click(ask)
    box.on_submit(ask) if hasattr(box, "on_submit") else None
    ask()
    return widgets.VBox([widgets.HBox([box, button]), picks, table])


# ---------------------------------------------------------------------------
# The shipped SFT checkpoint
# ---------------------------------------------------------------------------

SFT_CHECKPOINT = pretraining.CHECKPOINT_DIR / "sft_char.pt"
# The recipe of the shipped checkpoint (scripts/make_sft_checkpoint.py).
# 2000 steps at a peak of 2e-3 with a fifth of the rows pretraining text: 600 steps at 3e-3 with a tenth
# left reverse and count_words below 80 % and doubled the Shakespeare perplexity.
SFT_RECIPE = SFTConfig(steps=2000, batch_size=24, accumulation=1, learning_rate=2e-3, min_lr=1e-4, warmup=30,
                       mix=0.2, seed=0)
SFT_DATA = dict(n_train=1500, n_test=100, seed=0)


def load_sft_model(path=None, device=None) -> tuple[GPT, ChatTokenizer]:
    """The course's small instruction-following GPT and its chat tokenizer: the Phase 3 checkpoint
    fully fine-tuned on ``task_splits(**SFT_DATA).train`` (``scripts/make_sft_checkpoint.py``), in
    eval mode on ``device`` (default ``runtime.get_device()``). Its measured figures are in
    ``model.metadata``."""
    path = Path(path) if path is not None else SFT_CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/make_sft_checkpoint.py` from the course folder")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**state["config"]))
    model.load_state_dict(state["state_dict"])
    model.metadata = state.get("metadata", {})
    model.eval()
    return model.to(device or runtime.get_device()), ChatTokenizer.from_dict(state["tokenizer"])


def evaluation_set(splits: TaskSplits, per_family: int = 50) -> list[Example]:
    """The first ``per_family`` test instances of every family, the held-out one included."""
    out = []
    for family in FAMILIES:
        out += [ex for ex in splits.test + splits.held_out if ex.family == family][:per_family]
    return out


def make_sft_checkpoint(path=None, *, config: SFTConfig = SFT_RECIPE, threads: int | None = 2,
                        show_progress: bool = True, eval_per_family: int = 50) -> dict:
    """Fine-tune the Phase 3 checkpoint on the task families (CPU) and save it; return its metadata."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model, tokenizer = base_chat_model(device="cpu")
    splits = task_splits(**SFT_DATA)
    evaluation = evaluation_set(splits, eval_per_family)
    before = {"accuracy": evaluate(model, tokenizer, evaluation, max_new_tokens=40),
              "perplexity": corpus_perplexity(model)}
    result = sft_train(model, tokenizer, splits.train, config, pretrain_ids=pretraining_ids("train"),
                       show_progress=show_progress)
    after = {"accuracy": evaluate(model, tokenizer, evaluation, max_new_tokens=40),
             "perplexity": corpus_perplexity(model)}
    metadata = {"recipe": asdict(config), "data": SFT_DATA, "eval_per_family": eval_per_family,
                "base": before, "sft": after,
                "seconds": round(result.seconds, 1), "tokens_per_second": round(result.tokens_per_second),
                "final_loss": sum(result.losses[-20:]) / max(1, len(result.losses[-20:])),
                "torch": str(torch.__version__), "threads": torch.get_num_threads()}
    path = Path(path) if path is not None else SFT_CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "config": asdict(model.config),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "tokenizer": tokenizer.to_dict(), "metadata": metadata}, path)
    return metadata
