"""Unit tests for utils/transformer.py: the reference GPT that later phases build on, and Phase 2's helpers."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import transformer as tx


def small_config(**overrides):
    config = dict(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32)
    config.update(overrides)
    return tx.GPTConfig(**config)


class ReferenceCachedAttention(nn.Module):
    """Written here independently: the KV-cache protocol of exercise 7, by recomputing a bottom-right mask."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, past=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        n = k.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.arange(n)[None, :] > torch.arange(n - T, n)[:, None], float("-inf"))
        y = scores.softmax(-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


# --------------------------------------------------------------------------- the reference GPT

def test_default_config_is_the_agreed_interface():
    config = tx.GPTConfig()
    assert (config.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd,
            config.dropout, config.bias) == (65, 64, 4, 4, 128, 0.0, True)


def test_forward_returns_logits_and_mean_next_token_loss():
    torch.manual_seed(0)
    model = tx.GPT(small_config())
    idx = torch.randint(0, 37, (3, 10))
    targets = torch.randint(0, 37, (3, 10))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, 37)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1)))
    logits_alone, none = model(idx)
    assert none is None and torch.equal(logits_alone, logits)


def test_weights_are_tied_and_parameters_counted_once():
    model = tx.GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    v, t, layers, d = 37, 16, 2, 32
    assert model.num_parameters() == v * d + t * d + layers * (12 * d * d + 13 * d) + 2 * d
    assert model.num_parameters(non_embedding=True) == layers * (12 * d * d + 13 * d) + 2 * d
    no_bias = tx.GPT(small_config(bias=False))
    assert no_bias.num_parameters() == v * d + t * d + layers * (12 * d * d + 2 * d) + d


def test_gpt2_small_has_124m_parameters():
    with torch.device("meta"):
        model = tx.GPT(tx.GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert model.num_parameters() == 124_439_808


def test_too_long_context_is_refused():
    model = tx.GPT(small_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(1)
    model = tx.GPT(small_config()).eval()
    idx = torch.randint(0, 37, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 37
    with torch.no_grad():
        assert torch.allclose(model(idx)[0][:, :8], model(changed)[0][:, :8], atol=1e-6)


def test_from_hf_gpt2_gives_the_same_logits():
    hf = tx.tiny_gpt2(vocab_size=61, n_positions=20, n_embd=48, n_layer=3, n_head=6, seed=2)
    model = tx.GPT.from_hf_gpt2(hf).eval()
    assert model.config.block_size == 20 and model.config.n_layer == 3
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-5)


def test_from_hf_gpt2_with_transformers_default_initialisation():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=12, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=0, eos_token_id=0)).eval()
    model = tx.GPT.from_hf_gpt2(hf)
    idx = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], hf(idx).logits, atol=1e-5)


def test_load_gpt2_weights_names_what_is_missing():
    hf = tx.tiny_gpt2()

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = nn.Embedding(101, 48)

    with pytest.raises(AssertionError, match="no parameter named wte.weight"):
        tx.load_gpt2_weights(Wrong(), hf)


def test_cache_in_chunks_equals_the_full_forward():
    torch.manual_seed(3)
    model = tx.GPT(small_config()).eval()
    idx = torch.randint(0, 37, (2, 15))
    with torch.no_grad():
        full, _ = model(idx)
        cache = tx.KVCache(model.config.n_layer)
        pieces = [model(idx[:, :4], cache=cache)[0], model(idx[:, 4:5], cache=cache)[0],
                  model(idx[:, 5:11], cache=cache)[0], model(idx[:, 11:], cache=cache)[0]]
    assert cache.length == 15
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k", [(0, None), (1.0, None), (0.7, 5)])
def test_generation_with_and_without_cache_gives_the_same_tokens(temperature, top_k):
    torch.manual_seed(4)
    model = tx.GPT(small_config(block_size=24))
    prompt = torch.randint(0, 37, (3, 5))
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outputs.append(model.generate(prompt, 40, temperature=temperature, top_k=top_k, use_cache=use_cache))
    assert outputs[0].shape == (3, 45)
    assert torch.equal(outputs[0][:, :5], prompt)
    assert torch.equal(outputs[0], outputs[1])  # 40 new tokens also slide past block_size=24


def test_generation_restores_training_mode_and_respects_top_k():
    model = tx.GPT(small_config(dropout=0.1)).train()
    generator = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, top_k=1, generator=generator)
    assert model.training
    greedy = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, temperature=0)
    assert torch.equal(out, greedy)


def test_sample_greedy_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert tx.sample(logits, temperature=0).item() == 1
    draws = {tx.sample(logits, top_k=2).item() for _ in range(50)}
    assert draws <= {1, 3}


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = tx.GPT(small_config(dropout=0.5))
    idx = torch.randint(0, 37, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


# --------------------------------------------------------------------------- depth experiments

def test_arranged_blocks_are_wired_differently():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    outputs = {}
    for name in tx.ARRANGEMENTS:
        torch.manual_seed(1)
        outputs[name] = tx.ArrangedBlock(small_config(), name)(x)
    assert len({round(float(o.detach().sum()), 4) for o in outputs.values()}) == len(tx.ARRANGEMENTS)
    with pytest.raises(ValueError):
        tx.ArrangedBlock(small_config(), "sideways")


def test_gradient_vanishes_without_residuals_and_normalisation():
    plain = tx.gradient_norms_per_layer("no LN, no residual", n_layer=12, seeds=(0,))
    highway = tx.gradient_norms_per_layer("pre-LN", n_layer=12, seeds=(0,))
    assert plain[0] < 1e-8 * plain[-1]
    assert max(highway) < 100 * min(highway)
    assert torch.get_num_threads() >= 1


def test_gradient_norm_figure_leaves_gaps_for_zeros():
    fig = tx.gradient_norm_figure({"a": [0.0, 1e-3, 1.0], "b": [1.0, 1.0, 1.0]})
    assert fig.data[0].y[0] is None and fig.layout.yaxis.type == "log"


def test_training_deep_stacks_records_every_step_and_restores_threads():
    threads = torch.get_num_threads()
    seen = []
    losses = tx.train_deep_stacks(["pre-LN", "pre-LN, no residual"], 3, n_layer=2, device="cpu",
                                  on_step=lambda name, step, loss: seen.append((name, step)))
    assert [len(v) for v in losses.values()] == [3, 3]
    assert len(seen) == 6 and torch.get_num_threads() == threads
    assert all(math.isfinite(v) for values in losses.values() for v in values)


def test_copy_task_targets_look_back():
    idx, targets = tx.copy_task_batch(2, 12, torch.Generator().manual_seed(0), lag=3)
    assert (targets[:, :2] == -100).all()
    assert torch.equal(targets[:, 2:], idx[:, :10])


# --------------------------------------------------------------------------- encoder vs decoder, positions

def test_influence_matrix_is_lower_triangular_for_a_causal_function():
    torch.manual_seed(0)
    block = tx.Block(small_config()).eval()
    x = torch.randn(1, 7, 32)
    influence = tx.influence_matrix(block, x)
    assert influence.shape == (7, 7)
    assert influence.triu(1).abs().max() < 1e-4
    assert (influence.diagonal() > 0).all()
    fig = tx.influence_figure(influence, influence)
    assert len(fig.data) == 2


def test_positional_explorer_uses_the_functions_it_is_given_and_survives_unfinished_ones():
    import ipywidgets as widgets

    def sinusoidal(n, d, base=10000.0):
        p = torch.arange(n, dtype=torch.float64)[:, None]
        w = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        return torch.stack([torch.sin(p * w), torch.cos(p * w)], -1).reshape(n, d).float()

    def rope(x, positions, base=10000.0):
        d = x.shape[-1]
        angle = positions.double()[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape).float()

    box = tx.positional_explorer(sinusoidal, rope)
    assert isinstance(box, widgets.VBox)
    assert box.children[1].value == ""

    def unfinished(*args):
        raise NotImplementedError()

    box = tx.positional_explorer(unfinished, unfinished)
    assert "Not available yet" in box.children[1].value
    assert tx.positional_heatmap(sinusoidal(8, 4)).data[0].zmin == -1


def test_forbid_builtin_norms_switches_every_route_off_and_restores_them():
    x = torch.randn(2, 4)
    originals = (F.layer_norm, F.rms_norm, torch.layer_norm)
    for call in (lambda: nn.LayerNorm(4)(x), lambda: nn.RMSNorm(4)(x), lambda: F.rms_norm(x, (4,)),
                 lambda: torch.layer_norm(x, (4,)), lambda: F.group_norm(x[:, None, :], 1),
                 lambda: F.batch_norm(x.T, None, None, training=True), lambda: tx.RMSNorm(4)(x)):
        with pytest.raises(AssertionError, match="switched off"):
            with tx.forbid_builtin_norms():
                call()
    assert (F.layer_norm, F.rms_norm, torch.layer_norm) == originals
    with tx.forbid_builtin_norms():
        (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)


# --------------------------------------------------------------------------- KV-cache exercise helpers

def test_cached_lm_gives_the_same_logits_with_the_cache():
    model = tx.CachedLM(ReferenceCachedAttention, vocab_size=30, block_size=20, n_layer=2, n_embd=16, n_head=2)
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        full, presents = model(idx)
        first, past = model(idx[:, :5])
        rest = [first]
        for i in range(5, 12):
            logits, past = model(idx[:, i:i + 1], past)
            rest.append(logits)
    assert len(presents) == 2 and presents[0][0].shape == (2, 2, 12, 8)
    assert torch.allclose(torch.cat(rest, 1), full, atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 21, dtype=torch.long))


def test_replay_lm_logs_calls_and_matches_the_reference_gpt():
    model = tx.ReplayLM(seed=0)
    idx = torch.randint(0, 50, (2, 6))
    logits, past = model(idx[:, :4])
    last, past = model(idx[:, 4:], past)
    assert model.calls == [(4, False), (2, True)]
    assert torch.allclose(last, model.gpt(idx)[0][:, 4:], atol=1e-6)
    assert torch.equal(past, idx)


def test_time_generation_reports_both_ways():
    def greedy(model, idx, n, use_cache=True):
        past = None
        for _ in range(n):
            logits, past = model(idx if past is None or not use_cache else idx[:, -1:], past if use_cache else None)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return idx

    model = tx.CachedLM(ReferenceCachedAttention, vocab_size=30, block_size=40, n_embd=16, n_head=2)
    results = tx.time_generation(greedy, model, [2, 6])
    assert results["same tokens"] is True
    assert len(results["with cache"]) == len(results["without cache"]) == 2
    assert len(tx.generation_time_figure(results).data) == 2


def test_live_loss_curve_collects_points():
    curve = tx.LiveLossCurve(["a", "b"], every=2)
    for step in range(5):
        curve("a", step, 1.0 / (step + 1))
    curve.flush()
    assert list(curve.live.fig.data[0].x) == [0, 1, 2, 3, 4]
    assert len(curve.live.fig.data[1].x) == 0


# --------------------------------------------------------------------------- reference Llama pieces

def _rope_complex(x, positions, base=10000.0):
    """RoPE in its complex form (RoFormer, section 3.2), independent of the code under test."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    angles = positions.double()[..., None] * theta
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).reshape(x.shape).to(x.dtype)


def test_apply_rope_matches_the_complex_form_for_shared_and_per_sequence_positions():
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(tx.apply_rope(x, torch.arange(5) + 7), _rope_complex(x, torch.arange(5) + 7))
    per_sequence = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])  # e.g. left padding of 3 in sequence 1
    expected = torch.stack([_rope_complex(x[b], per_sequence[b]) for b in range(2)])
    torch.testing.assert_close(tx.apply_rope(x, per_sequence), expected)
    assert tx.apply_rope(x.double(), torch.arange(5)).dtype == torch.float64


@pytest.mark.parametrize("shape", [(4,), (2, 4), (3, 5), (1, 1, 5), (5, 1)])
def test_apply_rope_rejects_positions_it_cannot_place(shape):
    x = torch.randn(2, 3, 5, 8)  # T = 5, d/2 = 4: a (2, 4) tensor would broadcast silently
    with pytest.raises(ValueError, match="positions must have shape"):
        tx.apply_rope(x, torch.zeros(shape, dtype=torch.long))


def test_rms_norm_computes_in_float32_and_casts_back():
    x = (3 * torch.randn(16, 256)).to(torch.bfloat16)
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    out = tx.RMSNorm(256)(x)
    assert out.dtype == torch.bfloat16
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (out.double() - exact).abs().max() < (in_bf16.double() - exact).abs().max()
    x64 = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(tx.RMSNorm(8)(x64), nn.RMSNorm(8, eps=1e-6).double()(x64))


def test_shortcut_lists_hold_no_shared_decorator_code():
    """A decorated function's code is its decorator's wrapper, shared with every function decorated the same
    way (the student's too): the lists hold the functions underneath."""
    for targets, _ in tx.SWITCHED_OFF.values():
        for target in targets:
            code = getattr(target, "__code__", None)
            assert code is None or code.co_name not in ("decorate_context", "wrapper"), target


def test_the_exercise_shortcuts_are_switched_off():
    with pytest.raises(AssertionError, match="derive the formula"):
        with tx.shortcuts_off("count"):
            with torch.device("meta"):
                tx.GPT(tx.GPTConfig())
    with pytest.raises(AssertionError, match="write the cache yourself"):
        with tx.shortcuts_off("cache"):
            tx.KVCache(1)
    with tx.shortcuts_off("generation"):
        model = tx.ReplayLM(seed=0)  # the tests' own wrapper keeps working
        model(torch.zeros(1, 3, dtype=torch.long))

    @torch.no_grad()
    def students_generate():
        return 1

    with tx.shortcuts_off("generation"):
        assert students_generate() == 1


# --------------------------------------------------------------------------- the module docstrings

@pytest.mark.parametrize("module_name", ["transformer", "llama", "ablations"])
def test_module_docstring_names_only_what_exists(module_name):
    """Every ``name`` the docstring's list of contents mentions is defined in the module."""
    import importlib
    import re

    module = importlib.import_module(f"utils.{module_name}")
    listed = re.findall(r"``([A-Za-z_][A-Za-z0-9_.]*)``", module.__doc__)
    names = {name.split(".")[0] for name in listed if not name.startswith(("utils", "transformers", "torch"))}
    names -= {"model", "past", "presents", "n_kv_head", "n_head", "rope", "idx"}  # arguments named in the prose
    import transformers

    missing = sorted(n for n in names if not hasattr(module, n) and not hasattr(tx, n)
                     and not hasattr(transformers, n))  # the library's classes it loads from
    assert not missing, f"utils.{module_name}'s docstring names what it does not define: {missing}"


# --------------------------------------------------------------------------- the Llama of exercise 8

from utils import ablations, llama  # noqa: E402


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_reference_llama_gives_hugging_faces_logits_with_and_without_the_cache(n_kv_head):
    config = llama.LlamaConfig(vocab_size=41, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32, d_hidden=40,
                               rope_base=300.0, norm_eps=1e-5)
    hf = llama.tiny_llama(config, seed=n_kv_head)
    model = llama.Llama.from_hf(hf)
    idx = torch.randint(0, 41, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, presents = model(idx)
        first, past = model(idx[:, :4])
        second, _ = model(idx[:, 4:], past)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first, second], dim=1), expected, atol=2e-5, rtol=1e-5)
    assert presents[0][0].shape == (2, n_kv_head, 11, 8)


def test_the_two_rope_layouts_are_one_permutation_apart():
    weight = torch.randn(4 * 8, 5)
    assert torch.equal(llama.to_rotate_half(llama.to_interleaved(weight, 4), 4), weight)
    x = torch.randn(3, 2, 6, 8)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    positions = torch.arange(6) + 11
    torch.testing.assert_close(llama.rope_rotate_half(x[..., order], positions), tx.apply_rope(x, positions)[..., order])
    # Loading Hugging Face's rows unpermuted into a model that rotates neighbours changes the logits;
    # the same rows with rotate-half RoPE give them back.
    config = llama.LlamaConfig(vocab_size=30, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, d_hidden=24)
    hf = llama.tiny_llama(config, seed=3)
    idx = torch.randint(0, 30, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        unpermuted = llama.load_llama_weights(llama.Llama(config), hf, rope="rotate-half")(idx)[0]
        rotate_half = llama.load_llama_weights(llama.Llama(config, rope="rotate-half"), hf, rope="rotate-half")(idx)[0]
    assert (unpermuted - expected).abs().max() > 0.1
    torch.testing.assert_close(rotate_half, expected, atol=2e-5, rtol=1e-5)


def test_attention_reference_mistakes_differ_from_the_convention():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 24, generator=g, dtype=torch.float64)
    weights = [torch.randn(24, 24, generator=g, dtype=torch.float64) * 0.3, torch.randn(8, 24, generator=g, dtype=torch.float64) * 0.3,
               torch.randn(8, 24, generator=g, dtype=torch.float64) * 0.3, torch.randn(24, 24, generator=g, dtype=torch.float64) * 0.3]
    right, (k, v) = llama.attention_reference(x, *weights, 6, 2)
    assert k.shape == v.shape == (2, 2, 6, 4)
    for option in (dict(rope="rotate-half"), dict(kv_heads="tiled")):
        assert (llama.attention_reference(x, *weights, 6, 2, **option)[0] - right).abs().max() > 1e-3, option
    _, past = llama.attention_reference(x[:, :2], *weights, 6, 2)
    rest = llama.attention_reference(x[:, 2:], *weights, 6, 2, past=past)[0]
    torch.testing.assert_close(rest, right[:, 2:])
    assert (llama.attention_reference(x[:, 2:], *weights, 6, 2, past=past, offset=False)[0] - right[:, 2:]).abs().max() > 1e-3


def test_llama_loader_names_biases_tied_heads_and_missing_layers():
    config = llama.LlamaConfig(vocab_size=20, n_layer=1, n_head=2, n_kv_head=1, n_embd=8, d_hidden=12)
    hf = llama.tiny_llama(config)
    biased = llama.Llama(config)
    biased.lm_head = nn.Linear(8, 20)
    with pytest.raises(AssertionError, match="no biases"):
        llama.load_llama_weights(biased, hf)
    tied = llama.Llama(config)
    tied.lm_head.weight = tied.embed_tokens.weight
    with pytest.raises(AssertionError, match="untied"):
        llama.load_llama_weights(tied, hf)
    renamed = llama.Llama(config)
    renamed.final_norm = renamed.norm
    del renamed.norm
    with pytest.raises(AssertionError, match="no parameter named norm.weight"):
        llama.load_llama_weights(renamed, hf)


def test_llama_shortcuts_are_switched_off_and_the_students_own_code_runs():
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    for shortcut in (lambda: F.scaled_dot_product_attention(q, k, k, enable_gqa=True),
                     lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
                     lambda: tx.apply_rope(q, torch.arange(5)),
                     lambda: tx.RMSNorm(8)(q),
                     lambda: llama.SwiGLU(8, 4)(q)):
        with pytest.raises(AssertionError, match="write the grouped attention yourself"):
            with llama.shortcuts_off():
                shortcut()
    from utils import inference
    with pytest.raises(AssertionError, match="switched off"):
        with llama.shortcuts_off():
            inference.grouped_query_attention(q, k, k)

    def students_attention(q, k, v):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1) @ v

    with llama.shortcuts_off():
        out = students_attention(q, k, k)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, k, enable_gqa=True))


# --------------------------------------------------------------------------- the ablations

def test_ablation_variants_change_one_thing_each():
    config = ablations.AblationConfig(n_layer=2, n_head=2, n_embd=24, block_size=16)
    counts = {name: sum(p.numel() for p in ablations.VariantGPT(50, config, **kw).parameters())
              for name, kw in ablations.VARIANTS.items()}
    base = counts["GPT-2 block"]
    assert counts["no positions"] == counts["RoPE"] == base - 16 * 24          # no position table
    assert counts["SiLU MLP"] == base
    assert abs(counts["SwiGLU MLP"] - base) < 0.02 * base                    # 8d/3 wide: about the same size
    assert counts["post-LN"] == base - 2 * 24                                # no final LayerNorm
    idx = torch.randint(0, 50, (2, 16))
    for name, kw in ablations.VARIANTS.items():
        torch.manual_seed(0)
        logits, loss = ablations.VariantGPT(50, config, **kw)(idx, idx)
        assert logits.shape == (2, 16, 50) and torch.isfinite(loss), name
    torch.manual_seed(0)
    rope = ablations.VariantGPT(50, config, positions="rope")
    torch.manual_seed(0)
    none = ablations.VariantGPT(50, config, positions="none")
    assert not torch.allclose(rope(idx)[0], none(idx)[0])                    # same weights, RoPE changes the scores


def test_train_variant_is_reproducible_and_learns():
    pattern = torch.arange(6000) % 12                                        # a text a model can learn quickly
    data = pattern[:5000], pattern[5000:], 12
    config = ablations.AblationConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=8, steps=40, lr=1e-2,
                                      warmup=5, eval_batches=2)
    first = ablations.run_ablations(config, ["GPT-2 block"], data=data, device="cpu")[0]
    again = ablations.run_ablations(config, ["GPT-2 block"], data=data, device="cpu")[0]
    assert first["val_loss"] == again["val_loss"] and len(first["losses"]) == 40
    assert first["val_loss"] < math.log(12) - 0.5
    table = ablations.summarise([first, {**again, "val_loss": again["val_loss"] + 0.5}])
    assert table["GPT-2 block"]["seeds"] == 2 and table["GPT-2 block"]["high"] == first["val_loss"] + 0.5
    assert len(ablations.ablation_figure(table, "t").data) == 1


def test_the_shipped_ablations_cover_every_variant():
    shipped = ablations.load_shipped()
    table = ablations.summarise(shipped["runs"])
    assert list(table) == list(ablations.VARIANTS)
    assert all(row["seeds"] == shipped["seeds"] for row in table.values())
    assert all(1.0 < row["mean"] < math.log(75) - 0.5 for row in table.values())  # well below a uniform guess
    assert shipped["config"]["steps"] >= 100


def test_unigram_loss_is_the_cross_entropy_of_character_frequencies():
    train, val = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1])
    # add-one counts 4, 2, 1: p(0) = 4/7, p(1) = 2/7, p(2) = 1/7
    expected = -(math.log(4 / 7) + math.log(2 / 7)) / 2
    assert abs(ablations.unigram_loss(train, val, 3) - expected) < 1e-12


def test_gelu_variant_is_a_config_choice_and_gpt2s_stays_the_default():
    """GPT-2's tanh approximation by default; gelu="none" is the exact GELU that nanoGPT's recipe uses."""
    x = torch.randn(3, 5, 16) * 3
    for gelu in ("tanh", "none"):
        torch.manual_seed(0)
        mlp = tx.MLP(tx.GPTConfig(n_embd=16, gelu=gelu))
        expected = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate=gelu))
        assert torch.allclose(mlp(x), expected, atol=1e-6)
    assert tx.GPTConfig().gelu == "tanh"
    assert not torch.allclose(F.gelu(x, approximate="tanh"), F.gelu(x), atol=1e-5)
