"""utils.quantization: the reference quantizers the hidden tests trust, checked against independent
definitions (PyTorch's own quantized tensors, the QLoRA paper's numbers, exact integer arithmetic)."""

import math

import pytest
import torch
import torch.nn as nn

from utils import quantization as Q
from utils.transformer import GPT, GPTConfig


# PyTorch's quantized tensors are deprecated, but they remain an independent reference here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def test_absmax_per_tensor_matches_pytorchs_quantize_per_tensor():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q, scale = Q.absmax_quantize(w, 8)
    theirs = torch.quantize_per_tensor(w, float(scale), 0, torch.qint8).int_repr()
    # PyTorch rounds half to even like torch.round; the only possible difference is the clamp at -128
    assert torch.equal(q, theirs.clamp(-127, 127))
    assert torch.equal(Q.dequantize(q, scale), q.float() * scale)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 8), (3, 32), (2, 1)])
def test_absmax_error_is_within_half_a_step_and_integers_in_range(bits, group):
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(bits)) * 3
    q, scale = Q.absmax_quantize(w, bits, group)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 2 ** (bits - 1) - 1
    step = scale if group is None else scale.repeat_interleave(group, -1)
    assert ((Q.dequantize(q, scale) - w).abs() <= step / 2 + 1e-6).all()


def test_per_channel_matches_pytorchs_quantize_per_channel():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    q, scale = Q.absmax_quantize(w, 8, 16)
    theirs = torch.quantize_per_channel(w, scale.reshape(-1).double(), torch.zeros(6, dtype=torch.long), 0,
                                        torch.qint8).int_repr()
    assert torch.equal(q, theirs.clamp(-127, 127))


def test_zeropoint_matches_pytorchs_quint8_and_keeps_zero_exact():
    w = torch.rand(5, 20, generator=torch.Generator().manual_seed(2)) * 4 - 1
    w[0, 0] = 0.0
    q, scale, zero = Q.zeropoint_quantize(w, 8)
    theirs = torch.quantize_per_tensor(w, float(scale), int(zero), torch.quint8).int_repr()
    assert torch.equal(q, theirs)
    assert float(Q.zeropoint_dequantize(q, scale, zero)[0, 0]) == 0.0


def test_all_zero_groups_get_scale_one():
    q, scale = Q.absmax_quantize(torch.zeros(2, 8), 4, 4)
    assert torch.equal(scale, torch.ones(2, 2)) and int(q.abs().sum()) == 0
    q, scale, zero = Q.zeropoint_quantize(torch.zeros(3), 4)
    assert float(scale) == 1.0 and int(q.sum()) == 0


def test_quantized_linear_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(20, 32, generator=g), torch.randn(8, 32, generator=g)
    q_w, s_w = Q.absmax_quantize(w, 8, 32)
    q_x, s_x = Q.absmax_quantize(x, 8, 32)
    exact = (torch._int_mm(q_x, q_w.T.contiguous()).double() * s_x.double() * s_w.reshape(1, -1).double()).float()
    with Q.integer_matmuls_only():
        y = Q.quantized_linear(x, q_w, s_w.reshape(-1))
    assert torch.allclose(y, exact, rtol=1e-6, atol=1e-6)
    assert (y - x @ w.T).abs().max() < 0.02 * (x @ w.T).abs().max()


def test_integer_matmuls_only_catches_every_float_route():
    a = torch.randn(4, 4)
    for fn in (lambda: a @ a, lambda: torch.nn.functional.linear(a, a), lambda: torch.einsum("ij,jk->ik", a, a)):
        with pytest.raises(AssertionError), Q.integer_matmuls_only():
            fn()
    with Q.integer_matmuls_only():
        a.int() @ a.int()


def test_llm_int8_is_exact_on_outlier_columns_and_beats_per_tensor_int8():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 128, generator=g)
    x[:, [3, 90]] *= 40
    w = torch.randn(32, 128, generator=g) * 0.05
    exact = x @ w.T
    per_tensor = Q.dequantize(*Q.absmax_quantize(x, 8)) @ Q.dequantize(*Q.absmax_quantize(w, 8)).T
    decomposed = Q.llm_int8_matmul(x, w)
    assert (per_tensor - exact).abs().mean() > 10 * (decomposed - exact).abs().mean()
    # all columns outliers: exactly the float product; none: the W8A8 layer
    assert torch.allclose(Q.llm_int8_matmul(x, w, threshold=0.0), exact)
    q_w, s_w = Q.absmax_quantize(w, 8, 128)
    assert torch.allclose(Q.llm_int8_matmul(x, w, threshold=1e9), Q.quantized_linear(x, q_w, s_w.reshape(-1)))


def test_nf4_code_book_is_the_papers():
    assert torch.allclose(Q.nf4_code_book(), torch.tensor(Q.NF4_PAPER), atol=1e-6)


def test_nf4_quantize_picks_the_nearest_level():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    codes, absmax = Q.nf4_quantize(w, 64)
    book = Q.nf4_code_book()
    normalised = w / absmax[:, None]
    best = (normalised[..., None] - book).abs().min(-1).values
    assert torch.allclose((book[codes.long()] - normalised).abs(), best)
    assert torch.allclose(Q.nf4_dequantize(codes, absmax, 64), book[codes.long()] * absmax[:, None])


def test_double_quantized_bits():
    assert math.isclose(Q.double_quantized_bits(), 4 + 8 / 64 + 32 / (64 * 256))
    assert round(Q.double_quantized_bits(), 3) == 4.127


def test_bitlinear_forward_and_straight_through_gradients():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    y = Q.bitlinear(x, w)
    w_t, gamma = Q.ternary_weights(w.detach())
    assert set(w_t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    s = x.detach().abs().amax(-1, keepdim=True) / 127
    x_q = torch.round(x.detach() / s) * s
    assert torch.allclose(y, x_q @ (w_t * gamma).T, atol=1e-5)
    upstream = torch.randn(5, 8, generator=g)
    (y * upstream).sum().backward()
    assert torch.allclose(w.grad, upstream.T @ x_q, atol=1e-5)        # STE: d/dw of x_q @ w.T
    assert torch.allclose(x.grad, upstream @ (w_t * gamma), atol=1e-5)


def test_gptq_beats_round_to_nearest_on_its_calibration_data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)     # correlated inputs
    w = torch.randn(16, 32, generator=g)
    for bits in (3, 4):
        rtn = ((x @ Q.rtn(w, bits).T - x @ w.T) ** 2).mean()
        gptq = ((x @ Q.gptq_quantize(w, x, bits).T - x @ w.T) ** 2).mean()
        assert gptq < rtn


def test_awq_alpha_zero_is_round_to_nearest():
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(64, 16, generator=g), torch.randn(8, 16, generator=g)
    assert torch.allclose(Q.awq_quantize(w, x, 3, alpha=0.0), Q.rtn(w, 3), atol=1e-6)


def test_fake_quantized_model_and_weight_memory():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    twin = Q.fake_quantize_model(model, lambda w: torch.zeros_like(w))
    assert all(float(p.detach().abs().sum()) == 0 for p in Q.quantizable_weights(twin).values())
    assert any(float(p.detach().abs().sum()) > 0 for p in Q.quantizable_weights(model).values())
    full = Q.weight_memory(model, 32)
    assert full == sum(p.numel() for p in model.parameters()) * 4
    assert Q.weight_memory(model, 8) < full / 3


def test_qlora_model_trains_only_the_adapters():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=64))
    qlora = Q.qlora_model(model, r=2, alpha=4)
    trainable = [n for n, p in qlora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(isinstance(m, Q.NF4Linear) for m in qlora.modules())
    ids = torch.randint(0, 11, (200,), generator=torch.Generator().manual_seed(9))
    losses = Q.fine_tune(qlora, ids, steps=2, batch_size=2, block=8)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_ternary_gpt_has_bitlinear_layers():
    model = Q.ternary_gpt(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert sum(isinstance(m, Q.BitLinear) for m in model.modules()) == 4
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Q.BitLinear)


def test_round_to_format_and_table():
    x = torch.tensor([1.7, 70000.0])
    assert float(Q.round_to_format(x, "fp8 e4m3")[0]) == 1.75
    assert math.isinf(float(Q.round_to_format(x, "fp16")[1]))
    assert float(Q.round_to_format(x, "bf16")[1]) == pytest.approx(70000, rel=1e-2)
    assert {row["format"] for row in Q.format_table()} == set(Q.FORMATS)


@pytest.mark.skipif(not Q.weight_int8pack_available(), reason="this torch has no CPU _weight_int8pack_mm")
def test_pytorchs_fused_int8_kernel_computes_the_course_weight_only_product():
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(5, 64, generator=g), torch.randn(24, 64, generator=g)
    q, scale = Q.int8_weight_only(w)
    assert q.dtype == torch.int8 and scale.shape == (24,)
    assert torch.equal(q, torch.round(w / (w.abs().amax(1, keepdim=True) / 127)).to(torch.int8))
    expected = x @ (q.double() * scale.double()[:, None]).T.float()
    assert torch.allclose(torch._weight_int8pack_mm(x, q, scale), expected, atol=1e-4, rtol=1e-5)


def test_int8_matmul_timings_on_small_shapes():
    rows = Q.int8_matmul_timings(shapes=((1, 64, 32), (16, 32, 64)), repeats=2)
    assert len(rows) == 2 and rows[1]["shape (batch x out x in)"] == "16 x 32 x 64"
    for row in rows:
        assert row["fp32 matmul (ms)"] > 0 and row["dequantize, then fp32 matmul (ms)"] > 0
        if Q.weight_int8pack_available():
            assert float(row["kernel vs course, max |diff| / max |y|"]) < 1e-5


def test_block_linears_are_the_four_layers_of_each_block():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    names = Q.block_linears(model)
    assert len(names) == 8 and "lm_head" not in names and all(n.startswith("transformer.h.") for n in names)


def test_torchao_comparison_is_skipped_cleanly_without_torchao(monkeypatch):
    monkeypatch.setattr(Q, "torchao_available", lambda: False)
    assert Q.torchao_comparison(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)),
                                torch.zeros(2, 9, dtype=torch.long)) is None


def test_torchao_weight_only_int8_agrees_with_the_course():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    windows = torch.randint(0, 11, (4, 17), generator=torch.Generator().manual_seed(1))
    result = Q.torchao_comparison(model, windows)
    fp32, ours, theirs = (r["perplexity"] for r in result["rows"])
    assert abs(ours / fp32 - 1) < 0.01 and abs(theirs / fp32 - 1) < 0.01
    assert "127.5" in result["summary"]
