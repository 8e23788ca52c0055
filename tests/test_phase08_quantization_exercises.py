"""Mutation tests of Phase 8's quantization notebook: correct solutions written in other ways get full
marks, realistic wrong ones lose points (with a message naming the mistake where the visible test can),
and the shortcuts (the course's reference quantizers, PyTorch's or a library's) earn nothing."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/08_quantization/quantization.ipynb")
mutate = NB.mutate
check_correct = NB.assert_full_marks
check_wrong = NB.assert_loses_points


def test_notebook_has_the_six_exercises_in_order():
    assert NB.exercises() == ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6"]


SHORTCUTS = {
    "ex1": {
        "the course's reference quantizer": '''
def absmax_quantize(w, bits, group_size=None):
    return quantization.absmax_quantize(w, bits, group_size)

def dequantize(q, scale):
    return quantization.dequantize(q, scale)
''',
        "PyTorch's quantized tensors (per tensor only)": '''
def absmax_quantize(w, bits, group_size=None):
    qmax = 2 ** (bits - 1) - 1
    scale = float(w.abs().max()) / qmax
    q = torch.quantize_per_tensor(w.float(), scale, 0, torch.qint8).int_repr().clamp(-qmax, qmax)
    return q, torch.tensor(scale)

def dequantize(q, scale):
    return torch.dequantize(torch._make_per_tensor_quantized_tensor(q, float(scale), 0))
''',
    },
    "ex2": {
        "the course's reference quantizer": '''
def zeropoint_quantize(w, bits, group_size=None):
    return quantization.zeropoint_quantize(w, bits, group_size)

def zeropoint_dequantize(q, scale, zero):
    return quantization.zeropoint_dequantize(q, scale, zero)
''',
    },
    "ex3": {
        "the course's reference layer": '''
def quantized_linear(x, q_w, w_scale, bias=None):
    return quantization.quantized_linear(x, q_w, w_scale, bias)
''',
        "dequantized weights in a float matmul": '''
def quantized_linear(x, q_w, w_scale, bias=None):
    absmax = x.abs().amax(dim=1, keepdim=True)
    x_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    x_hat = torch.round(x / x_scale).clamp(-127, 127) * x_scale
    return F.linear(x_hat, q_w.float() * w_scale[:, None], bias)
''',
    },
    "ex4": {
        "the course's reference decomposition": '''
def llm_int8_matmul(x, w, threshold=6.0):
    return quantization.llm_int8_matmul(x, w, threshold)
''',
    },
    "ex5": {
        "the course's reference code book and quantizer": '''
def normal_float_code_book(bits=4):
    return quantization.nf4_code_book()

def nf4_quantize(w, block_size=64):
    return quantization.nf4_quantize(w, block_size)
''',
    },
    "ex6": {
        "the course's reference BitLinear": '''
def bitlinear(x, w, eps=1e-5):
    return quantization.bitlinear(x, w, eps)
''',
        "the course's BitLinear module": '''
def bitlinear(x, w, eps=1e-5):
    layer = quantization.BitLinear(w.shape[1], w.shape[0], bias=False)
    layer.weight = nn.Parameter(w) if not w.requires_grad else layer.weight
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer(x)
''',
    },
}


# ---------------------------------------------------------------------------------------------
# Exercise 1: absmax quantization
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "unflatten and a loop-free scale per group, clamp via min/max": '''
def absmax_quantize(w, bits, group_size=None):
    top = 2 ** (bits - 1) - 1
    if group_size is None:
        m = w.abs().max()
        scale = (m / top) if m > 0 else torch.tensor(1.0)
        q = torch.maximum(torch.minimum((w / scale).round(), torch.tensor(top)), torch.tensor(-top))
        return q.to(torch.int8), scale.float().reshape(())
    g = w.unflatten(-1, (-1, group_size))
    m = g.abs().max(dim=-1).values
    scale = torch.where(m == 0, torch.ones_like(m), m / top)
    q = (g / scale.unsqueeze(-1)).round().clamp(-top, top).to(torch.int8).flatten(-2)
    return q, scale

def dequantize(q, scale):
    if scale.ndim == 0:
        return q.to(torch.float32) * scale
    g = q.unflatten(-1, (scale.shape[-1], -1)).to(torch.float32)
    return (g * scale.unsqueeze(-1)).flatten(-2)
''',
}

EX1_WRONG = {
    "truncation instead of rounding": (("q = torch.round(groups / scale).clamp(-qmax, qmax)",
                                        "q = (groups / scale).clamp(-qmax, qmax)"), "truncated"),
    "max(w) instead of max|w|": (("absmax = groups.abs().amax(dim=-1, keepdim=True)",
                                  "absmax = groups.amax(dim=-1, keepdim=True)"), None),
    "2**bits - 1 levels": (("qmax = 2 ** (bits - 1) - 1", "qmax = 2 ** bits - 1"), None),
    "2**(bits-1), 128 overflows": (("qmax = 2 ** (bits - 1) - 1", "qmax = 2 ** (bits - 1)"), None),
    "zero group divides by zero": (("scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)).float()",
                                    "scale = (absmax / qmax).float()"), None),
    "groups along the wrong axis": (("groups = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)",
                                     "groups = w.transpose(0, -1).reshape(-1, group_size) if w.dim() > 1 else w.reshape(-1, group_size)"),
                                    None),
    "dequantize with repeat (tiles the scales)": (("scale.repeat_interleave(group_size, dim=-1)",
                                                   "scale.repeat(*([1] * (scale.dim() - 1)), group_size)"), None),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    check_correct("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    (old, new), message = EX1_WRONG[name]
    check_wrong("ex1", mutate("ex1", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 2: zero-point quantization
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "int64 zero point, explicit min/max": '''
def zeropoint_quantize(w, bits, group_size=None):
    levels = 2 ** bits - 1
    shape = w.shape
    g = w.reshape(1, -1) if group_size is None else w.reshape(-1, group_size)
    lo = torch.minimum(g.min(dim=1).values, torch.zeros(()))
    hi = torch.maximum(g.max(dim=1).values, torch.zeros(()))
    scale = (hi - lo) / levels
    scale[hi == lo] = 1.0
    zero = torch.clamp(torch.round(-lo / scale), 0, levels).long()
    q = torch.clamp(torch.round(g / scale[:, None]) + zero[:, None], 0, levels).to(torch.uint8).reshape(shape)
    if group_size is None:
        return q, scale.reshape(()), zero.reshape(())
    out = (*shape[:-1], shape[-1] // group_size)
    return q, scale.reshape(out), zero.reshape(out)

def zeropoint_dequantize(q, scale, zero):
    if scale.dim() == 0:
        return (q.long() - zero.long()).float() * scale
    g = q.long().reshape(-1, q.shape[-1] // scale.shape[-1])
    return ((g - zero.long().reshape(-1, 1)).float() * scale.reshape(-1, 1)).reshape(q.shape)
''',
}

EX2_WRONG = {
    "range without 0": (("lo = groups.amin(dim=-1, keepdim=True).clamp(max=0)", "lo = groups.amin(dim=-1, keepdim=True)"),
                        None),
    "zero point not rounded": (("zero = torch.round(-lo / scale).clamp(0, qmax)", "zero = (-lo / scale).clamp(0, qmax)"),
                               None),
    "uint8 subtraction wraps": (("return (q.float() - zero.float()) * scale", "return (q - zero.to(torch.uint8)).float() * scale"),
                                None),
    "2**(bits-1) levels": (("qmax = 2 ** bits - 1", "qmax = 2 ** (bits - 1) - 1"), None),
    "plus instead of minus zero": (("return (q.float() - zero.float()) * scale", "return (q.float() + zero.float()) * scale"),
                                   None),
}


def test_ex2_correct_alternative_gets_full_marks():
    check_correct("ex2", EX2_CORRECT["int64 zero point, explicit min/max"])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    (old, new), message = EX2_WRONG[name]
    check_wrong("ex2", mutate("ex2", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 3: W8A8 linear layer
# ---------------------------------------------------------------------------------------------

EX3_CORRECT = {
    "int64 einsum": '''
def quantized_linear(x, q_w, w_scale, bias=None):
    s = x.abs().max(dim=-1, keepdim=True).values / 127
    s[s == 0] = 1
    qx = (x / s).round().clamp(-127, 127).long()
    acc = torch.einsum("nk,ok->no", qx, q_w.long())
    y = acc.double() * s.double() * w_scale.double()
    y = y.float()
    if bias is not None:
        y = y + bias
    return y
''',
    "torch._int_mm when the shapes allow it": '''
def quantized_linear(x, q_w, w_scale, bias=None):
    absmax = x.abs().amax(1, keepdim=True)
    sx = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    qx = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
    n, k = qx.shape
    if n > 16 and k % 8 == 0 and q_w.shape[0] % 8 == 0:
        acc = torch._int_mm(qx, q_w.T.contiguous())
    else:
        acc = qx.int() @ q_w.int().T
    out = acc.float() * sx * w_scale[None, :]
    return out + bias if bias is not None else out
''',
}

EX3_WRONG = {
    "per-tensor activation scale": (("absmax = x.abs().amax(dim=1, keepdim=True)", "absmax = x.abs().amax().reshape(1, 1)"),
                                    "one scale for all of x"),
    "int8 products overflow": (("acc = q_x.to(torch.int32) @ q_w.to(torch.int32).T",
                                "acc = (q_x.to(torch.int16) @ q_w.to(torch.int16).T).to(torch.int32)"), None),
    "float matmul": (("acc = q_x.to(torch.int32) @ q_w.to(torch.int32).T", "acc = q_x.float() @ q_w.float().T"),
                     "integers"),
    "w_scale forgotten": (("y = acc.float() * x_scale * w_scale", "y = acc.float() * x_scale"), "w_scale"),
    "bias forgotten": (("return y if bias is None else y + bias", "return y"), "bias"),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    check_correct("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    (old, new), message = EX3_WRONG[name]
    check_wrong("ex3", mutate("ex3", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 4: LLM.int8()
# ---------------------------------------------------------------------------------------------

EX4_CORRECT = {
    "index lists and a zero-filled weight instead of slicing": '''
def llm_int8_matmul(x, w, threshold=6.0):
    cols = torch.nonzero((x.abs() > threshold).sum(0) > 0).flatten()
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[cols] = False
    out = x.index_select(1, cols) @ w.index_select(1, cols).T
    if int(keep.sum()) == 0:
        return out
    xr, wr = x[:, keep], w[:, keep]
    q, s = quantization.absmax_quantize(wr, 8, wr.shape[-1])
    return out + quantization.quantized_linear(xr, q, s.flatten())
''',
}

EX4_WRONG = {
    "no decomposition": (("outliers = (x.abs() > threshold).any(dim=0)", "outliers = torch.zeros(x.shape[1], dtype=torch.bool)"),
                         "no decomposition"),
    "outliers also in the int8 part": (("rest = ~outliers", "rest = torch.ones_like(outliers)"), None),
    ">= instead of >": (("outliers = (x.abs() > threshold).any(dim=0)", "outliers = (x.abs() >= threshold).any(dim=0)"), None),
    "threshold on w": (("outliers = (x.abs() > threshold).any(dim=0)", "outliers = (w.abs() > threshold).any(dim=0)"), None),
}


def test_ex4_correct_alternative_gets_full_marks():
    check_correct("ex4", EX4_CORRECT["index lists and a zero-filled weight instead of slicing"])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    (old, new), message = EX4_WRONG[name]
    check_wrong("ex4", mutate("ex4", (old, new)), message)


# ---------------------------------------------------------------------------------------------
# Exercise 5: NF4
# ---------------------------------------------------------------------------------------------

EX5_CORRECT = {
    "torch.distributions and bucketize on midpoints": '''
def normal_float_code_book(bits=4):
    n = 2 ** bits
    top = 1 - (1 / (2 * n) + 1 / (2 * (n - 1))) / 2
    icdf = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).icdf
    pos = icdf(torch.linspace(top, 0.5, n // 2 + 1, dtype=torch.float64))[:-1]
    neg = -icdf(torch.linspace(top, 0.5, n // 2, dtype=torch.float64))[:-1]
    book = torch.sort(torch.cat([neg, pos, torch.zeros(1, dtype=torch.float64)])).values
    return (book / book.abs().max()).to(torch.float32)

def nf4_quantize(w, block_size=64):
    book = normal_float_code_book()
    flat = w.reshape(-1, block_size).float()
    m = flat.abs().max(dim=1).values
    m = torch.where(m == 0, torch.ones_like(m), m)
    mids = (book[1:] + book[:-1]) / 2
    codes = torch.bucketize(flat / m[:, None], mids)
    return codes.to(torch.uint8).reshape(w.shape), m
''',
}

EX5_WRONG = {
    "evenly spaced levels": (("positive = torch.special.ndtri(torch.linspace(p, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])",
                              "positive = torch.linspace(1, 0, n // 2 + 1, dtype=torch.float64)[:-1]"), None),
    "symmetric: 8 negative levels": (("negative = -torch.special.ndtri(torch.linspace(p, 0.5, n // 2, dtype=torch.float64)[:-1])",
                                      "negative = -positive"), None),
    "offset 1 - 1/(2n)": (("p = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))", "p = 1 - 1 / (2 * n)"), None),
    "not normalised": (("return (levels / levels.abs().max()).sort().values.float()", "return levels.sort().values.float()"),
                       None),
    "one absmax for the whole tensor": (("absmax = blocks.abs().amax(dim=1)", "absmax = blocks.abs().amax().expand(blocks.shape[0])"),
                                        None),
    "blocks down the columns": (("blocks = w.float().reshape(-1, block_size)",
                                 "blocks = w.float().T.reshape(-1, block_size) if w.dim() == 2 else w.float().reshape(-1, block_size)"),
                                None),
}


def test_ex5_correct_alternative_gets_full_marks():
    check_correct("ex5", EX5_CORRECT["torch.distributions and bucketize on midpoints"])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    (old, new), message = EX5_WRONG[name]
    check_wrong("ex5", mutate("ex5", (old, new)), message)


def test_ex5_the_paper_values_copied_lose_the_hidden_points():
    source = '''
def normal_float_code_book(bits=4):
    return torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                         -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                         0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                         0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
''' + NB.solution_source("ex5").split("def nf4_quantize")[1].join(["\ndef nf4_quantize", ""])
    outcome = check_wrong("ex5", source)
    assert outcome.earned["ex5_test_code_book"] == 0


# ---------------------------------------------------------------------------------------------
# Exercise 6: BitLinear with a straight-through estimator
# ---------------------------------------------------------------------------------------------

EX6_CORRECT = {
    "a custom autograd Function for the rounding": '''
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def bitlinear(x, w, eps=1e-5):
    gamma = w.abs().mean()
    w_t = torch.clamp(_RoundSTE.apply(w / (gamma + eps)), -1, 1)
    w_q = w + (w_t * gamma - w).detach()
    s = x.abs().amax(-1, keepdim=True).clamp_min(eps) / 127
    x_q = x + (torch.clamp(torch.round(x / s), -127, 127) * s - x).detach()
    return torch.matmul(x_q, w_q.t())
''',
}

EX6_WRONG = {
    "no STE on the weights": (("w_ste = w + (w_q - w).detach()", "w_ste = w_q"), "w.grad"),
    "everything detached": (("return x_ste @ w_ste.T", "return (x_ste @ w_ste.T).detach()"), None),
    "absmax weights": (("gamma = w.abs().mean()", "gamma = w.abs().max()"), None),
    "no clamp to [-1, 1]": (("w_q = torch.clamp(torch.round(w / (gamma + eps)), -1, 1) * gamma",
                             "w_q = torch.round(w / (gamma + eps)) * gamma"), None),
    "one activation scale per tensor": (("x_scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / 127",
                                         "x_scale = x.abs().amax().clamp(min=eps) / 127"), None),
    "activations not quantized": (("x_ste = x + (x_q - x).detach()", "x_ste = x"), "activations not quantized"),
}


def test_ex6_correct_alternative_gets_full_marks():
    check_correct("ex6", EX6_CORRECT["a custom autograd Function for the rounding"])


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    (old, new), message = EX6_WRONG[name]
    check_wrong("ex6", mutate("ex6", (old, new)), message)
