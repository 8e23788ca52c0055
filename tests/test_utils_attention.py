"""Unit tests for utils/attention.py (Phase 1 helpers) and utils/plots.py."""

import math

import plotly.graph_objects as go
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import attention as A
from utils import checks
from utils import plots


def softmax_attention_weights(q, k, mask=None, scale=None):
    """The textbook formula, written here independently of the helpers under test."""
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


class MeanAttention(nn.Module):
    """Uniform attention: enough to run the reversal model without exercise 1."""

    def forward(self, query, keys, mask=None):
        weights = torch.full(keys.shape[:2], 1.0 / keys.shape[1])
        return keys.mean(1), weights


# --------------------------------------------------------------------------- plots

def test_heatmap_puts_row_zero_on_top_and_accepts_tensors():
    z = torch.arange(6.0, requires_grad=True).reshape(2, 3)
    fig = plots.heatmap(z, x=["a", "b", "c"], y=["r0", "r1"], title="t", text_format=".1f")
    assert isinstance(fig, go.Figure)
    assert [list(row) for row in fig.data[0].z] == [[0, 1, 2], [3, 4, 5]]
    assert fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.title.text == "t"


def test_repeated_labels_stay_distinct_and_in_order():
    fig = plots.heatmap(torch.zeros(1, 3), x=["the", "cat", "the"])
    labels = list(fig.data[0].x)
    assert len(set(labels)) == 3
    assert [label.replace("\u200b", "") for label in labels] == ["the", "cat", "the"]


def test_heatmap_grid_shares_one_colour_scale():
    fig = plots.heatmap_grid([torch.rand(3, 3) for _ in range(4)], ["a", "b", "c", "d"])
    assert len(fig.data) == 4
    assert {trace.coloraxis for trace in fig.data} == {"coloraxis"}
    assert [a.text for a in fig.layout.annotations] == ["a", "b", "c", "d"]


def test_line_chart_draws_one_trace_per_series_and_keeps_gaps():
    fig = plots.line_chart([1, 2, 3], {"x": [1.0, None, 3.0], "y": torch.tensor([1.0, 2.0, 4.0])}, log_y=True)
    assert [t.name for t in fig.data] == ["x", "y"]
    assert fig.data[0].y[1] is None
    assert fig.layout.yaxis.type == "log"


# --------------------------------------------------------------------------- reversal task

def test_reversal_batch_is_reversed_and_reproducible():
    src, tgt = A.reversal_batch(5, 7, torch.Generator().manual_seed(0))
    assert src.shape == tgt.shape == (5, 7)
    assert torch.equal(tgt, src.flip(-1))
    assert src.min() >= 0 and src.max() < A.N_DIGITS
    again, _ = A.reversal_batch(5, 7, torch.Generator().manual_seed(0))
    assert torch.equal(src, again)


def test_reversal_model_shapes_and_training_loop():
    model = A.ReversalModel(MeanAttention(), d_model=16)
    src, tgt = A.reversal_batch(3, 6)
    logits, weights = model(src, tgt)
    assert logits.shape == (3, 6, A.VOCAB_SIZE)
    assert weights.shape == (3, 6, 6)
    losses = A.train_reversal(model, 3, length=5, batch_size=4)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_alignment_figure_shows_one_row_per_output_digit():
    fig = A.alignment_figure(A.ReversalModel(MeanAttention(), d_model=8), length=5)
    assert len(fig.data[0].z) == 5 and len(fig.data[0].z[0]) == 5
    assert "accuracy" in fig.layout.title.text


# --------------------------------------------------------------------------- references

def test_reference_weights_match_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.7
    mask[:, 0] = True
    torch.testing.assert_close(A.reference_weights(q, k), softmax_attention_weights(q, k))
    torch.testing.assert_close(A.reference_weights(q, k, mask), softmax_attention_weights(q, k, mask))
    torch.testing.assert_close(A.reference_weights(q, k, scale=1.0), softmax_attention_weights(q, k, scale=1.0))
    causal = torch.ones(4, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(A.reference_weights(q[..., :4, :], k[..., :4, :], is_causal=True),
                               softmax_attention_weights(q[..., :4, :], k[..., :4, :], causal[:, :4]))


def test_naive_attention_equals_pytorch():
    q, k, v = (torch.randn(1, 9, 4) for _ in range(3))
    torch.testing.assert_close(A.naive_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_saturation_figure_shows_unscaled_softmax_saturating():
    fig = A.saturation_figure(dims=(4, 256), n_queries=64)
    scaled, unscaled = (list(t.y) for t in fig.data)
    assert unscaled[1] > 0.9 > scaled[1]
    assert abs(scaled[1] - scaled[0]) < 0.1  # with the scale, d hardly matters


def test_copy_mha_weights_reproduces_pytorchs_module():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(12, 3, batch_first=True)

    class Projections(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(12, 12) for _ in range(4))

    mine = A.copy_mha_weights(theirs, Projections())
    x = torch.randn(2, 5, 12)
    q, k, v = (p(x).view(2, 5, 3, 4).transpose(1, 2) for p in (mine.q_proj, mine.k_proj, mine.v_proj))
    heads = softmax_attention_weights(q, k) @ v
    ours = mine.out_proj(heads.transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(ours, theirs(x, x, x, need_weights=False)[0])


# --------------------------------------------------------------------------- test tools

@pytest.mark.parametrize("call", [
    lambda x: torch.softmax(x, -1), lambda x: F.softmax(x, dim=-1), lambda x: x.softmax(-1),
    lambda x: nn.Softmax(dim=-1)(x), lambda x: F.log_softmax(x, dim=-1), lambda x: torch.special.softmax(x, -1),
    lambda x: F.scaled_dot_product_attention(x, x, x), lambda x: torch._C._nn.scaled_dot_product_attention(x, x, x),
], ids=["torch.softmax", "F.softmax", "Tensor.softmax", "nn.Softmax", "log_softmax", "special.softmax",
        "F.sdpa", "C sdpa"])
def test_forbid_builtins_switches_off_every_route(call):
    x = torch.randn(2, 3, 4)
    with pytest.raises(AssertionError, match="switched off"):
        with A.forbid_builtins():
            call(x)
    call(x)  # back on afterwards


def test_forbid_builtins_can_allow_softmax_and_restores_after_errors():
    x = torch.randn(2, 3, 4)
    with A.forbid_builtins(softmax=False):
        torch.softmax(x, -1)
        torch.exp(x).sum(-1)
    # A shortcut fails the block even if the code under test swallowed the error.
    with pytest.raises(AssertionError, match="attention"):
        with A.forbid_builtins(softmax=False):
            try:
                F.scaled_dot_product_attention(x, x, x)
            except AssertionError:
                pass
    with pytest.raises(ValueError):
        with A.forbid_builtins():
            raise ValueError("student bug")
    assert F.scaled_dot_product_attention(x, x, x).shape == x.shape


@pytest.mark.parametrize("call", [
    lambda x: nn.MultiheadAttention(4, 2, batch_first=True)(x, x, x),
    lambda x: F.multi_head_attention_forward(x, x, x, 4, 2, torch.randn(12, 4), torch.zeros(12), None, None, False,
                                             0.0, torch.randn(4, 4), torch.zeros(4), need_weights=False),
    lambda x: A.reference_weights(x, x), lambda x: A.naive_attention(x, x, x),
], ids=["nn.MultiheadAttention", "F.multi_head_attention_forward", "reference_weights", "naive_attention"])
def test_forbid_builtins_switches_off_multihead_attention_and_the_course_helpers(call):
    x = torch.randn(2, 3, 4)
    with pytest.raises(AssertionError, match="switched off"):
        with A.forbid_builtins(softmax=False, attention=False):
            call(x)


def test_exercise_4_may_use_pytorchs_attention():
    x = torch.randn(2, 3, 4)
    with A.forbid_builtins(softmax=False, attention=False):
        F.scaled_dot_product_attention(x, x, x)


@pytest.mark.parametrize("call", [
    lambda: __import__("torch.nn.attention.bias", fromlist=["x"]).causal_lower_right(2, 4)._materialize(),
    lambda: nn.Transformer.generate_square_subsequent_mask(4),
], ids=["causal_lower_right", "generate_square_subsequent_mask"])
def test_forbid_mask_builders_switches_off_the_ready_made_masks(call):
    call()
    with pytest.raises(AssertionError, match="build them"):
        with A.forbid_mask_builders():
            call()
    with A.forbid_mask_builders():
        torch.ones(3, 4, dtype=torch.bool).tril(1)


def _online(q, k, v, block):
    """Exercise 5's algorithm, written here independently of the notebook."""
    m = torch.full(q.shape[:-1] + (1,), float("-inf"))
    den = torch.zeros(q.shape[:-1] + (1,))
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],))
    for start in range(0, k.shape[-2], block):
        s = q @ k[..., start:start + block, :].mT / math.sqrt(q.shape[-1])
        new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - new)
        den = den * torch.exp(m - new) + p.sum(-1, keepdim=True)
        acc = acc * torch.exp(m - new) + p @ v[..., start:start + block, :]
        m = new
    return acc / den


def _two_pass(q, k, v, block):
    blocks = list(zip(k.split(block, -2), v.split(block, -2)))
    m = torch.stack([(q @ kb.mT).amax(-1) for kb, _ in blocks]).amax(0)[..., None] / math.sqrt(q.shape[-1])
    p = [torch.exp(q @ kb.mT / math.sqrt(q.shape[-1]) - m) for kb, _ in blocks]
    return sum(pb @ vb for pb, (_, vb) in zip(p, blocks)) / sum(pb.sum(-1, keepdim=True) for pb in p)


def _whole_rows(q, k, v, block):
    return torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), -1) @ v


def test_tiled_reads_sees_each_block_of_keys_and_values_once():
    q, k, v = torch.randn(1, 1, 4), torch.randn(1, 100, 4), torch.randn(1, 100, 3)
    with A.TiledReads(k, v) as record:
        out = _online(q, k, v, 32)
    assert sorted(record.reads["keys"]) == [(0, 31), (32, 63), (64, 95), (96, 99)]
    assert sorted(record.reads["values"]) == [(0, 31), (32, 63), (64, 95), (96, 99)]
    assert record.largest_bytes <= 32 * 4 * 4  # a block of scores or less: no view of k counts
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError):
        A.TiledReads(torch.randn(2, 10, 4), torch.randn(2, 10, 4))  # one sequence only


def test_check_one_pass_accepts_the_online_softmax_and_names_the_other_algorithms():
    q, k, v = torch.randn(1, 1, 8), torch.randn(1, 256, 8), torch.randn(1, 256, 8)
    torch.testing.assert_close(A.check_one_pass(_online, q, k, v, 32), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(AssertionError, match="two-pass softmax"):
        A.check_one_pass(_two_pass, q, k, v, 32)
    with pytest.raises(AssertionError, match="read keys 0..255"):
        A.check_one_pass(_whole_rows, q, k, v, 32)
    with pytest.raises(AssertionError, match="switched off"):
        A.check_one_pass(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v), q, k, v, 32)


def test_new_memory_counts_copies_not_views():
    a = torch.randn(64, 8)
    with A.NewMemory() as record:
        a.t()
        a[:10]
        a[:10].clone()
    assert record.largest_bytes == 10 * 8 * 4 and record.largest_shape == (10, 8)


def test_largest_tensor_sees_new_memory_not_views():
    a, b = torch.randn(64, 8), torch.randn(8, 32)
    with checks.LargestTensor() as record:
        a.t()
        a[:10]
        a.expand(3, 64, 8)
    assert record.largest_bytes <= a.numel() * 4
    with checks.LargestTensor() as record:
        out = a @ b
    assert record.largest_bytes == out.numel() * 4 and record.largest_shape == (64, 32)
    with checks.LargestTensor() as record:  # the full score matrix of textbook attention is seen
        A.naive_attention(torch.randn(1, 100, 4), torch.randn(1, 100, 4), torch.randn(1, 100, 4))
    assert record.largest_bytes >= 100 * 100 * 4


# --------------------------------------------------------------------------- explorer

def test_toy_heads_show_their_patterns():
    q, k = A.toy_heads()
    t = len(A.EXPLORER_TOKENS)
    assert q.shape == k.shape == (4, t, 16)
    weights = softmax_attention_weights(q, k)
    argmax = weights.argmax(-1)
    assert argmax[0, 1:].tolist() == list(range(t - 1))  # previous token
    assert (argmax[2] == 0).all()                          # first token
    words = A.EXPLORER_TOKENS
    for i, j in enumerate(argmax[1].tolist()):            # same word
        assert words[i] == words[j]
    with pytest.raises(ValueError):
        A.toy_heads(d=4)


def explorer_parts(box):
    controls, source, status, figure = box.children
    temperature, masking = controls.children
    return temperature, masking, source, status, figure


def test_explorer_updates_in_place_and_falls_back():
    def unfinished(*args):
        raise NotImplementedError()

    box = A.attention_explorer(sdpa=unfinished, causal_mask=unfinished, padding_mask=unfinished)
    temperature, masking, source, status, figure = explorer_parts(box)
    before = [list(map(list, trace.z)) for trace in figure.data]
    masking.value = "causal"
    after = [torch.tensor(trace.z) for trace in figure.data]
    assert before != [t.tolist() for t in after]
    assert all((t.triu(1) == 0).all() for t in after)
    source.value = "yours"
    assert "not finished" in status.value
    masking.value = "padding"
    assert all((torch.tensor(trace.z)[:, -3:] == 0).all() for trace in figure.data)
    temperature.value = 0.1
    assert "0.10" in figure.layout.title.text


def test_explorer_uses_the_students_functions():
    calls = []

    def sdpa(q, k, v, mask=None):
        calls.append(mask)
        bias = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        return None, A.reference_weights(q, k, bias)

    def causal(t):
        return torch.ones(t, t, dtype=torch.bool).tril()

    def padding(lengths, t):
        return torch.arange(t)[None, :] < lengths[:, None]

    box = A.attention_explorer(sdpa=sdpa, causal_mask=causal, padding_mask=padding)
    _, masking, source, status, figure = explorer_parts(box)
    source.value = "yours"
    masking.value = "causal"
    assert calls and calls[-1] is not None and status.value == ""
    assert all((torch.tensor(trace.z).triu(1) == 0).all() for trace in figure.data)


def test_explorer_without_anywidget_redraws_in_an_output_area(monkeypatch):
    import ipywidgets

    def needs_anywidget(*args, **kwargs):
        raise ImportError("Please install anywidget to use the FigureWidget class")

    monkeypatch.setattr(go, "FigureWidget", needs_anywidget)
    box = A.attention_explorer()
    _, masking, _, _, output = explorer_parts(box)
    assert isinstance(output, ipywidgets.Output)
    masking.value = "causal"  # redraws without error


# --------------------------------------------------------------------------- benchmark

def test_benchmark_records_time_and_memory_and_skips_unfinished_work():
    def unfinished(q, k, v):
        raise NotImplementedError()

    results = A.benchmark_attention({"naive": A.naive_attention, "fused": F.scaled_dot_product_attention,
                                     "yours": unfinished}, [16, 32], d=4, repeats=1, time_only=["fused"])
    assert results["lengths"] == [16, 32]
    assert set(results["largest_mb"]) == {"naive", "yours"}
    assert results["largest_mb"]["naive"][1] * 2**20 >= 32 * 32 * 4
    assert results["seconds"]["yours"] == [None, None] and results["largest_mb"]["yours"] == [None, None]
    assert all(s > 0 for s in results["seconds"]["fused"])
    memory, seconds = A.benchmark_figures(results)
    assert "measured on this machine" in memory.layout.title.text
    assert "measured on this machine" in seconds.layout.title.text


def test_time_call_returns_the_median():
    assert A.time_call(lambda: None, repeats=3) >= 0.0
