"""Mutation tests of Phase 2's graded tests: correct solutions written in other ways get full marks,
realistic wrong ones lose points (with a message that names the mistake where the visible test can),
the untouched stub earns nothing, and code that hands the work to the course's reference GPT fails."""

import pytest

from notebook_harness import SourceNotebook

NB = SourceNotebook("solutions/02_transformer/transformer.ipynb")
mutate = NB.mutate
EXERCISES = ["ex1", "ex2", "ex3", "ex4", "ex5", "ex6", "ex7", "ex8"]


def check_mistake(exercise, replacements, message):
    NB.assert_loses_points(exercise, mutate(exercise, *replacements), message)


def test_phase_has_the_eight_exercises_in_order():
    assert NB.exercises() == EXERCISES


# ---------------------------------------------------------------------------------------------
# Exercise 1: sinusoidal positional encoding
# ---------------------------------------------------------------------------------------------

EX1_CORRECT = {
    "float32, exp-log frequencies, stack and flatten": '''
def sinusoidal_positions(n_positions, d_model, base=10000.0):
    position = torch.arange(n_positions).float().unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(base) / d_model))
    return torch.stack([torch.sin(position * frequency), torch.cos(position * frequency)], dim=-1).flatten(1)
''',
    "Python loops with the math module": '''
def sinusoidal_positions(n_positions, d_model, base=10000.0):
    pe = torch.empty(n_positions, d_model)
    for p in range(n_positions):
        for i in range(d_model // 2):
            angle = p / base ** (2 * i / d_model)
            pe[p, 2 * i] = math.sin(angle)
            pe[p, 2 * i + 1] = math.cos(angle)
    return pe
''',
}

EX1_WRONG = {
    "sines and cosines swapped": (
        [("pe[:, 0::2] = torch.sin(angles)", "pe[:, 0::2] = torch.cos(angles)"),
         ("pe[:, 1::2] = torch.cos(angles)", "pe[:, 1::2] = torch.sin(angles)")], "swapped"),
    "halves instead of interleaved": (
        [("pe[:, 0::2] = torch.sin(angles)", "pe[:, : d_model // 2] = torch.sin(angles)"),
         ("pe[:, 1::2] = torch.cos(angles)", "pe[:, d_model // 2:] = torch.cos(angles)")], "interleaved"),
    "exponent without the factor 2": (
        [("torch.arange(0, d_model, 2, dtype=torch.float64) / d_model",
          "torch.arange(d_model // 2, dtype=torch.float64) / d_model")], "base^(-i/d)"),
    "frequencies multiplied": ([("base ** (-torch.arange", "base ** (torch.arange")], "multiplying instead of dividing"),
    "float64 returned": ([("return pe.float()", "return pe")], "float32"),
    "base ignored": ([("base ** (-torch", "10000.0 ** (-torch")], "base=100.0"),
}


@pytest.mark.parametrize("name", EX1_CORRECT)
def test_ex1_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex1", EX1_CORRECT[name])


@pytest.mark.parametrize("name", EX1_WRONG)
def test_ex1_mistakes_lose_points(name):
    check_mistake("ex1", *EX1_WRONG[name])


# ---------------------------------------------------------------------------------------------
# Exercise 2: RoPE
# ---------------------------------------------------------------------------------------------

EX2_CORRECT = {
    "complex numbers": '''
def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    angles = positions.to(x.dtype)[:, None] * theta
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
''',
    "repeat_interleave and a rotated copy": '''
def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    inverse = torch.exp(-math.log(base) * torch.arange(0, d, 2, dtype=x.dtype) / d)
    angles = positions.to(x.dtype).unsqueeze(-1) * inverse
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    turned = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + turned * sin
''',
}

EX2_WRONG = {
    "rotate-half pairing": (
        [("first, second = x[..., 0::2], x[..., 1::2]", "first, second = x[..., : d // 2], x[..., d // 2:]"),
         ("out[..., 0::2] = first * cos - second * sin", "out[..., : d // 2] = first * cos - second * sin"),
         ("out[..., 1::2] = first * sin + second * cos", "out[..., d // 2:] = first * sin + second * cos")],
        "neighbouring pairs"),
    "rotation the wrong way": ([("out[..., 0::2] = first * cos - second * sin", "out[..., 0::2] = first * cos + second * sin"),
                                ("out[..., 1::2] = first * sin + second * cos", "out[..., 1::2] = -first * sin + second * cos")],
                               "wrong way"),
    "exponent without the factor 2": ([("torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d",
                                        "torch.arange(d // 2, dtype=torch.float64, device=x.device) / d")], "base^(-i/d)"),
    "positions ignored": ([("angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * theta",
                            "angles = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * theta")],
                          "does not change with the distance"),
    "second element of each pair not rotated": ([("out[..., 1::2] = first * sin + second * cos", "out[..., 1::2] = second")],
                                                 "apply_rope"),
    "x modified in place": ([("out = torch.empty_like(x)", "out = x"),
                             ("first, second = x[..., 0::2], x[..., 1::2]",
                              "first, second = x[..., 0::2].clone(), x[..., 1::2].clone()")], "in place"),
}


@pytest.mark.parametrize("name", EX2_CORRECT)
def test_ex2_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex2", EX2_CORRECT[name])


@pytest.mark.parametrize("name", EX2_WRONG)
def test_ex2_mistakes_lose_points(name):
    check_mistake("ex2", *EX2_WRONG[name])


# ---------------------------------------------------------------------------------------------
# Exercise 3: LayerNorm and RMSNorm
# ---------------------------------------------------------------------------------------------

EX3_HEADER = '''
class LayerNorm(nn.Module):
    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x):
{ln}

class RMSNorm(nn.Module):
    def __init__(self, d_model, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
{rms}
'''

EX3_CORRECT = {
    "var_mean and a norm": EX3_HEADER.format(ln='''
        variance, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        return torch.addcmul(self.bias, (x - mean) * torch.rsqrt(variance + self.eps), self.weight)''', rms='''
        mean_square = x.norm(dim=-1, keepdim=True).pow(2) / x.shape[-1]
        return self.weight * x / (mean_square + self.eps).sqrt()'''),
    "var(unbiased=False) and einsum": EX3_HEADER.format(ln='''
        centred = x - x.mean(-1, keepdim=True)
        return self.weight * centred / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps) + self.bias''', rms='''
        mean_square = torch.einsum("...d,...d->...", x, x).unsqueeze(-1) / x.shape[-1]
        return x.div(torch.sqrt(mean_square + self.eps)).mul(self.weight)'''),
}

LN = "return (x - mean) / torch.sqrt(variance + self.eps) * self.weight + self.bias"
RMS = "return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight"
EX3_WRONG = {
    "unbiased variance": ([("variance = (x - mean).pow(2).mean(dim=-1, keepdim=True)",
                            "variance = x.var(dim=-1, keepdim=True)")], "unbiased variance"),
    "eps outside the square root": ([(LN, "return (x - mean) / (torch.sqrt(variance) + self.eps) * self.weight + self.bias")],
                                    "eps added outside"),
    "LayerNorm without weight and bias": ([(LN, "return (x - mean) / torch.sqrt(variance + self.eps)")], "weight and bias left out"),
    "F.layer_norm": ([(LN, "return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)")], "switched off"),
    "LayerNorm eps ignored": ([("torch.sqrt(variance + self.eps)", "torch.sqrt(variance + 1e-5)")], "eps=0.1"),
    "RMSNorm subtracts the mean": ([(RMS, "x = x - x.mean(-1, keepdim=True)\n        " + RMS)], "mean subtracted"),
    "RMSNorm eps outside": ([(RMS, "return x / (x.pow(2).mean(dim=-1, keepdim=True).sqrt() + self.eps) * self.weight")],
                            "eps added outside"),
    "RMSNorm sum of squares": ([(RMS, "return x * torch.rsqrt(x.pow(2).sum(dim=-1, keepdim=True) + self.eps) * self.weight")],
                               "sum of squares"),
    "nn.RMSNorm inside": ([(RMS, "return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)")], "switched off"),
    "RMSNorm without weight": ([(RMS, "return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)")],
                               "weight left out"),
}


@pytest.mark.parametrize("name", EX3_CORRECT)
def test_ex3_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex3", EX3_CORRECT[name])


@pytest.mark.parametrize("name", EX3_WRONG)
def test_ex3_mistakes_lose_points(name):
    check_mistake("ex3", *EX3_WRONG[name])


def test_ex3_one_wrong_norm_costs_only_its_own_cell():
    outcome = NB.run("ex3", mutate("ex3", (RMS, "return x * self.weight")))
    assert outcome.earned == {"ex3_test_layernorm": 3.0, "ex3_test_rmsnorm": 0.0}


# ---------------------------------------------------------------------------------------------
# Exercise 4: SwiGLU
# ---------------------------------------------------------------------------------------------

EX4_HEADER = '''
class SwiGLU(nn.Module):
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
'''

EX4_CORRECT = {
    "sigmoid written out, matmuls": EX4_HEADER + '''
        gate = x @ self.w_gate.weight.T
        return (gate * torch.sigmoid(gate) * (x @ self.w_up.weight.T)) @ self.w_down.weight.T
''',
    "F.linear and nn.functional.silu": EX4_HEADER + '''
        hidden = nn.functional.silu(F.linear(x, self.w_gate.weight)).mul(F.linear(x, self.w_up.weight))
        return F.linear(hidden, self.w_down.weight)
''',
}

SWIGLU = "return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))"
EX4_WRONG = {
    "SiLU on the up branch": ([(SWIGLU, "return self.w_down(F.silu(self.w_up(x)) * self.w_gate(x))")], "up branch"),
    "sigmoid (GLU)": ([(SWIGLU, "return self.w_down(torch.sigmoid(self.w_gate(x)) * self.w_up(x))")], "GLU"),
    "GELU (GEGLU)": ([(SWIGLU, "return self.w_down(F.gelu(self.w_gate(x)) * self.w_up(x))")], "GEGLU"),
    "no gating": ([(SWIGLU, "return self.w_down(F.silu(self.w_gate(x)))")], "no gating"),
    "ReLU": ([(SWIGLU, "return self.w_down(F.relu(self.w_gate(x)) * self.w_up(x))")], "SwiGLU(8, 12)(x)"),
}


@pytest.mark.parametrize("name", EX4_CORRECT)
def test_ex4_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex4", EX4_CORRECT[name])


@pytest.mark.parametrize("name", EX4_WRONG)
def test_ex4_mistakes_lose_points(name):
    check_mistake("ex4", *EX4_WRONG[name])


# ---------------------------------------------------------------------------------------------
# Exercise 5: the pre-LN block and GPT
# ---------------------------------------------------------------------------------------------

EX5_ALTERNATIVE = '''
from einops import rearrange


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, causal=True):
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal:
            t = x.shape[1]
            hidden = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
            scores = scores.masked_fill(hidden, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.c_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        h = self.c_fc(x)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.mlp = MLP(n_embd)

    def forward(self, x, causal=True):
        h = x + self.attn(self.ln_1(x), causal=causal)
        return h + self.mlp(self.ln_2(h))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wte.weight = self.lm_head.weight
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList()
        for _ in range(config.n_layer):
            self.h.append(Block(config.n_embd, config.n_head))
        self.ln_f = nn.LayerNorm(config.n_embd)

    def forward(self, idx, targets=None):
        positions = torch.arange(idx.shape[1], device=idx.device)[None, :]
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x, causal=True)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        log_probs = torch.log_softmax(logits, dim=-1)
        return logits, -log_probs.gather(-1, targets[..., None]).mean()
'''

EX5_CORRECT = {
    "einops, hand-written attention and GELU, tied the other way round": EX5_ALTERNATIVE,
    "nn.Sequential-free, F.scaled_dot_product_attention with an explicit mask, sum / count loss":
        NB.solution_source("ex5").replace(
            "y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)",
            "mask = torch.ones(T, T, dtype=torch.bool).tril() if causal else None\n"
            "        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)").replace(
            "loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))",
            "loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction='sum') / targets.numel()"),
}

ATTN_SPLIT = "q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))"
EX5_WRONG = {
    "no residual connections": ([("x = x + self.attn(self.ln_1(x), causal)\n        return x + self.mlp(self.ln_2(x))",
                                  "x = self.attn(self.ln_1(x), causal)\n        return self.mlp(self.ln_2(x))")],
                                "no residual connections"),
    "post-LN": ([("x = x + self.attn(self.ln_1(x), causal)\n        return x + self.mlp(self.ln_2(x))",
                  "x = self.ln_1(x + self.attn(x, causal))\n        return self.ln_2(x + self.mlp(x))")], "post-LN"),
    "heads interleaved": ([(ATTN_SPLIT, "q, k, v = (t.view(B, T, C // self.n_head, self.n_head).permute(0, 3, 1, 2) "
                                        "for t in (q, k, v))")], "GPT-2's block 0"),
    "keys and queries swapped": ([("q, k, v = self.c_attn(x).split(C, dim=-1)", "k, q, v = self.c_attn(x).split(C, dim=-1)")],
                                 "GPT-2's block 0"),
    "causal flag ignored": ([("is_causal=causal", "is_causal=True")], "causal=False"),
    "no mask at all": ([("is_causal=causal", "is_causal=False")], "GPT-2's block 0"),
    "exact GELU": ([("return self.c_proj(self.gelu(self.c_fc(x)))", "return self.c_proj(F.gelu(self.c_fc(x)))")],
                   "GPT-2's block 0"),
    "no weight tying": ([("        self.lm_head.weight = self.wte.weight\n", "")], "weight tying"),
    "no final LayerNorm": ([("logits = self.lm_head(self.ln_f(x))", "logits = self.lm_head(x)")], "logits"),
    "no position embedding": ([("x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))", "x = self.wte(idx)")],
                              "logits"),
    "targets shifted again": ([("loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))",
                                "loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), "
                                "targets[:, 1:].reshape(-1))")], "shifts the targets again"),
    "summed loss": ([("targets.reshape(-1))", "targets.reshape(-1), reduction='sum')")], "mean cross-entropy"),
    "a loss even without targets": ([("        loss = None\n        if targets is not None:\n            loss",
                                      "        targets = idx if targets is None else targets\n        if True:\n            loss")],
                                    "must be None"),
}


@pytest.mark.parametrize("name", EX5_CORRECT)
def test_ex5_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex5", EX5_CORRECT[name])


@pytest.mark.parametrize("name", EX5_WRONG)
def test_ex5_mistakes_lose_points(name):
    check_mistake("ex5", *EX5_WRONG[name])


# Ways of handing the work to the course's reference GPT (utils.transformer) or to transformers.
EX5_REFERENCE_GPT = '''
class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        reference = tx.GPT(config)
        self.wte, self.wpe = reference.transformer.wte, reference.transformer.wpe
        self.h, self.ln_f, self.lm_head = reference.transformer.h, reference.transformer.ln_f, reference.lm_head
        object.__setattr__(self, "_reference", reference)   # hidden from named_modules

    def forward(self, idx, targets=None):
        return self._reference(idx, targets)
'''

EX5_CHEATS = {
    "aliases of the reference classes": (
        NB.solution_source("ex5") + "\nGPT = tx.GPT\nMLP = tx.MLP\nCausalSelfAttention = tx.CausalSelfAttention\n",
        "ex5_test_gpt2"),
    "a subclass of the reference GPT": (
        NB.solution_source("ex5") + "\nclass GPT(tx.GPT):\n    def __init__(self, config):\n"
        "        super().__init__(config)\n        self.wte, self.wpe = self.transformer.wte, self.transformer.wpe\n"
        "        self.h, self.ln_f = self.transformer.h, self.transformer.ln_f\n", "ex5_test_gpt2"),
    "a wrapper that runs the reference GPT": (
        NB.solution_source("ex5").split("class GPT(nn.Module):")[0] + EX5_REFERENCE_GPT, "ex5_test_gpt2"),
    "a block built from the reference's sub-modules": (
        NB.solution_source("ex5").replace("self.mlp = MLP(n_embd)",
                                          "self.mlp = tx.MLP(tx.GPTConfig(n_embd=n_embd, n_head=n_head))"),
        "ex5_test_block"),
}


@pytest.mark.parametrize("name", EX5_CHEATS)
def test_ex5_reference_code_does_not_pass(name):
    source, cell = EX5_CHEATS[name]
    outcome = NB.run("ex5", source)
    assert outcome.earned[cell] == 0, f"{name} earned the points of {cell}"


def test_ex5_cheating_wrapper_is_caught_by_the_visible_test_too():
    """The wrapper would give GPT-2's logits: the reference GPT is switched off in the visible test as well."""
    source = NB.solution_source("ex5").split("class GPT(nn.Module):")[0] + EX5_REFERENCE_GPT
    visible = NB.cells["ex5_test_gpt2"].source.split("### BEGIN HIDDEN TESTS")[0]
    namespace = {"__name__": "__main__"}
    exec(NB.cells["setup"].source, namespace)
    exec(source, namespace)
    with pytest.raises(AssertionError, match="switched off"):
        exec(visible, namespace)


# ---------------------------------------------------------------------------------------------
# Exercise 6: parameter count
# ---------------------------------------------------------------------------------------------

EX6_CORRECT = {
    "the expanded polynomial": '''
def gpt_num_params(vocab_size, block_size, n_layer, n_embd, bias=True, tied=True):
    d = n_embd
    if bias:
        total = vocab_size * d + block_size * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    else:
        total = vocab_size * d + block_size * d + n_layer * (12 * d * d + 2 * d) + d
    return total if tied else total + vocab_size * d
''',
    "module by module": '''
def gpt_num_params(vocab_size, block_size, n_layer, n_embd, bias=True, tied=True):
    def linear(n_in, n_out, with_bias=bias):
        return n_in * n_out + (n_out if with_bias else 0)

    def layer_norm(n):
        return 2 * n if bias else n

    d = n_embd
    block = layer_norm(d) + linear(d, 3 * d) + linear(d, d) + layer_norm(d) + linear(d, 4 * d) + linear(4 * d, d)
    head = 0 if tied else linear(d, vocab_size, with_bias=False)
    return sum([vocab_size * d, block_size * d, n_layer * block, layer_norm(d), head])
''',
}

COUNT = "return embeddings + n_layer * per_block + layer_norm + unembedding"
EX6_WRONG = {
    "tied head counted twice": ([("unembedding = 0 if tied else vocab_size * d", "unembedding = vocab_size * d")],
                                "counted a second time"),
    "no position embedding": ([("embeddings = vocab_size * d + block_size * d", "embeddings = vocab_size * d")], "wpe"),
    "no final LayerNorm": ([(COUNT, "return embeddings + n_layer * per_block + unembedding")], "ln_f"),
    "no block LayerNorms": ([("per_block = attention + mlp + 2 * layer_norm", "per_block = attention + mlp")],
                            "two LayerNorms"),
    "no biases": ([("(4 * d if bias else 0)", "0"), ("(5 * d if bias else 0)", "0")], "biases"),
    "LayerNorm bias kept when bias=False": ([("layer_norm = 2 * d if bias else d", "layer_norm = 2 * d")], ""),  # hidden only
    "untied head forgotten": ([("unembedding = 0 if tied else vocab_size * d", "unembedding = 0")], "untied"),
    "float result": ([(COUNT, "return float(embeddings + n_layer * per_block + layer_norm + unembedding)")], "int"),
    "MLP of width 2d": ([("mlp = 8 * d * d + (5 * d if bias else 0)", "mlp = 4 * d * d + (3 * d if bias else 0)")],
                        "an MLP of width 2d"),
}


@pytest.mark.parametrize("name", EX6_CORRECT)
def test_ex6_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex6", EX6_CORRECT[name])


@pytest.mark.parametrize("name", EX6_WRONG)
def test_ex6_mistakes_lose_points(name):
    check_mistake("ex6", *EX6_WRONG[name])


# ---------------------------------------------------------------------------------------------
# Exercise 7: KV cache
# ---------------------------------------------------------------------------------------------

EX7_ALTERNATIVE_1 = '''
class CachedSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, past=None):
        B, T, C = x.shape
        heads = self.c_attn(x).reshape(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        if past is not None:
            past_k, past_v = past
            k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        n_keys = k.shape[-2]
        query_pos = torch.arange(n_keys - T, n_keys)[:, None]
        key_pos = torch.arange(n_keys)[None, :]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


def generate(model, idx, max_new_tokens, use_cache=True):
    with torch.no_grad():
        cache = None
        step = 0
        while step < max_new_tokens:
            if not use_cache:
                logits = model(idx)[0]
            elif cache is None:
                logits, cache = model(idx)
            else:
                logits, cache = model(idx[:, -1:], cache)
            idx = torch.cat((idx, torch.argmax(logits[:, -1, :], dim=-1)[:, None]), dim=1)
            step += 1
    return idx
'''

EX7_ALTERNATIVE_2 = '''
class CachedSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, past=None):
        B, T, C = x.shape
        q, k, v = [t.reshape(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).chunk(3, dim=-1)]
        t_past = 0 if past is None else past[0].shape[2]
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        bias = torch.full((T, t_past + T), float("-inf")).triu(diagonal=t_past + 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.c_proj(y.transpose(1, 2).flatten(2)), (k, v)


@torch.inference_mode()
def generate(model, idx, max_new_tokens, use_cache=True):
    tokens = [idx]
    past = None
    for step in range(max_new_tokens):
        sequence = torch.cat(tokens, dim=1)
        feed = sequence if (past is None or not use_cache) else tokens[-1]
        logits, new_past = model(feed, past) if use_cache else model(feed)
        if use_cache:
            past = new_past
        tokens.append(logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)
'''

EX7_CORRECT = {"hand-written attention, while loop": EX7_ALTERNATIVE_1,
               "float mask, inference_mode, list of tokens": EX7_ALTERNATIVE_2}

MASKED = "y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)"
EX7_WRONG = {
    "is_causal=True with a cache": ([(MASKED, "y = F.scaled_dot_product_attention(q, k, v, is_causal=True)")],
                                    "top-left"),
    "causal only without a cache, no mask with one": ([(MASKED, "y = F.scaled_dot_product_attention(q, k, v, "
                                                               "is_causal=past is None)")], "bottom-right"),
    "no mask": ([(MASKED, "y = F.scaled_dot_product_attention(q, k, v)")], "plain causal attention"),
    "new keys before the old ones": ([("k = torch.cat([past[0], k], dim=2)", "k = torch.cat([k, past[0]], dim=2)"),
                                      ("v = torch.cat([past[1], v], dim=2)", "v = torch.cat([v, past[1]], dim=2)")],
                                     "a chunk of 4 new tokens"),
    "only the new keys returned": ([("return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)",
                                     "return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), (k[:, :, -T:], v[:, :, -T:])")],
                                   "keys after 7"),
    "whole sequence fed with the cache": ([("model(idx if past is None else idx[:, -1:], past)", "model(idx, past)")],
                                          "the calls were"),
    "past never passed back": ([("model(idx if past is None else idx[:, -1:], past)",
                                 "model(idx if past is None else idx[:, -1:], None)")], "the calls were"),
    "first position's logits": ([("logits[:, -1].argmax(dim=-1, keepdim=True)", "logits[:, 0].argmax(dim=-1, keepdim=True)")],
                                "differ from greedy"),
    "only the new tokens returned": ([("    return idx\n", "    return idx[:, -max_new_tokens:]\n")], "generate(model, prompt, 12)"),
}


@pytest.mark.parametrize("name", EX7_CORRECT)
def test_ex7_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex7", EX7_CORRECT[name])


@pytest.mark.parametrize("name", EX7_WRONG)
def test_ex7_mistakes_lose_points(name):
    check_mistake("ex7", *EX7_WRONG[name])


def test_ex7_generate_with_the_reference_model_is_not_enough():
    """Calling the reference GPT's own generate ignores the model it is given: the call log shows it."""
    source = NB.solution_source("ex7").split("@torch.no_grad()")[0] + '''
def generate(model, idx, max_new_tokens, use_cache=True):
    return model.gpt.generate(idx, max_new_tokens, temperature=0, use_cache=use_cache)
'''
    outcome = NB.run("ex7", source)
    assert outcome.earned["ex7_test_generate"] == 0


# ---------------------------------------------------------------------------------------------
# Exercise 8: a Llama (GQA, RoPE with the cache offset, RMSNorm, SwiGLU) with Hugging Face's weights
# ---------------------------------------------------------------------------------------------

EX8_ATTENTION_INIT = """
class GroupedQueryAttention(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head, rope_base=10000.0):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.rope_base = rope_base
        self.q_proj = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)
"""

# What the notebook intends: the student's own apply_rope, RMSNorm and SwiGLU of exercises 2-4 (the notebook
# runs from the top, so they are defined when exercise 8 runs; here their reference solutions stand in).
EX8_FROM_THE_PIECES = NB.solution_source("ex2") + "\n\n" + NB.solution_source("ex3") + "\n\n" + \
    NB.solution_source("ex4") + "\n\n" + EX8_ATTENTION_INIT + """
    def forward(self, x, past=None):
        B, T, C = x.shape
        q = self.q_proj(x).unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.n_kv_head, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_head, self.head_dim)).transpose(1, 2)
        start = past[0].shape[-2] if past else 0
        positions = torch.arange(start, start + T)
        q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        if past:
            k, v = torch.cat((past[0], k), -2), torch.cat((past[1], v), -2)
        group = self.n_head // self.n_kv_head
        k_all = k[:, :, None].expand(B, self.n_kv_head, group, *k.shape[2:]).reshape(B, self.n_head, -1, self.head_dim)
        v_all = v[:, :, None].expand(B, self.n_kv_head, group, *v.shape[2:]).reshape(B, self.n_head, -1, self.head_dim)
        scores = torch.matmul(q, k_all.transpose(2, 3)) * self.head_dim ** -0.5
        query_at = torch.arange(start, start + T)[:, None]
        key_at = torch.arange(start + T)[None, :]
        scores = scores + torch.where(key_at > query_at, float("-inf"), 0.0)
        out = torch.softmax(scores, dim=-1) @ v_all
        return self.o_proj(out.transpose(1, 2).flatten(2)), (k, v)


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = GroupedQueryAttention(config.n_embd, config.n_head, config.n_kv_head, config.rope_base)
        self.post_attention_layernorm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.d_hidden)

    def forward(self, x, past=None):
        attended, present = self.self_attn(self.input_layernorm(x), past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, past=None):
        x = self.embed_tokens(idx)
        past = past or [None] * len(self.layers)
        presents = []
        for layer, layer_past in zip(self.layers, past):
            x, present = layer(x, layer_past)
            presents.append(present)
        return self.lm_head(self.norm(x)), presents
"""

EX8_BROADCAST = EX8_ATTENTION_INIT + """
    def forward(self, x, past=None):
        # Queries viewed as (B, n_kv_head, G, T, d): each key head is shared by broadcasting; complex RoPE; einsum.
        B, T, C = x.shape
        G = self.n_head // self.n_kv_head
        t_past = 0 if past is None else past[0].shape[2]
        theta = torch.exp(-math.log(self.rope_base) * torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        turn = torch.polar(torch.ones(T, self.head_dim // 2, dtype=torch.float64),
                           torch.arange(t_past, t_past + T, dtype=torch.float64)[:, None] * theta)

        def rotate(t):
            z = torch.view_as_complex(t.double().reshape(*t.shape[:-1], -1, 2).contiguous())
            return torch.view_as_real(z * turn).reshape(t.shape).to(t.dtype)

        q = rotate(self.q_proj(x).reshape(B, T, self.n_head, self.head_dim).permute(0, 2, 1, 3))
        k = rotate(self.k_proj(x).reshape(B, T, self.n_kv_head, self.head_dim).permute(0, 2, 1, 3))
        v = self.v_proj(x).reshape(B, T, self.n_kv_head, self.head_dim).permute(0, 2, 1, 3)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        grouped = q.reshape(B, self.n_kv_head, G, T, self.head_dim)
        scores = torch.einsum("bkgtd,bksd->bkgts", grouped, k) / math.sqrt(self.head_dim)
        hidden = torch.triu(torch.ones(T, k.shape[2], dtype=torch.bool), diagonal=t_past + 1)
        weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        y = torch.einsum("bkgts,bksd->bkgtd", weights, v).reshape(B, self.n_head, T, self.head_dim)
        return self.o_proj(y.permute(0, 2, 1, 3).reshape(B, T, -1)), (k, v)


class RMS(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Gated(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False),
                                               nn.Linear(hidden, d, bias=False))

    def forward(self, x):
        gate = self.w_gate(x)
        return self.w_down(gate * torch.sigmoid(gate) * self.w_up(x))


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMS(config.n_embd, config.norm_eps), RMS(config.n_embd, config.norm_eps)
        self.self_attn = GroupedQueryAttention(config.n_embd, config.n_head, config.n_kv_head, rope_base=config.rope_base)
        self.mlp = Gated(config.n_embd, config.d_hidden)

    def forward(self, x, past=None):
        y, present = self.self_attn(self.input_layernorm(x), past=past)
        h = x + y
        return h + self.mlp(self.post_attention_layernorm(h)), present


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList()
        for _ in range(config.n_layer):
            self.layers.append(LlamaBlock(config))
        self.norm = RMS(config.n_embd, config.norm_eps)

    def forward(self, idx, past=None):
        h, presents = self.embed_tokens(idx), []
        for i in range(len(self.layers)):
            h, present = self.layers[i](h, past[i] if past else None)
            presents += [present]
        return self.lm_head(self.norm(h)), presents
"""

EX8_CORRECT = {"built from exercises 2-4's apply_rope, RMSNorm and SwiGLU, heads expanded": EX8_FROM_THE_PIECES,
               "groups by broadcasting, complex RoPE, einsum, own norm and MLP": EX8_BROADCAST}

ROTATE = ("            even, odd = t[..., 0::2], t[..., 1::2]\n"
          "            return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)")
REPEAT = "k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)"
EX8_WRONG = {
    "key/value heads tiled (repeat)": ([(REPEAT, "k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)")],
                                       "repeat_interleave"),
    "rotate-half RoPE (Hugging Face's code copied)": (
        [(ROTATE, "            half = t.shape[-1] // 2\n"
                  "            even, odd = t[..., :half], t[..., half:]\n"
                  "            return torch.cat([even * cos - odd * sin, even * sin + odd * cos], dim=-1)")],
        "rotate-half pairing"),
    "no position offset": ([("torch.arange(t_past, t_past + T, dtype=torch.float64", "torch.arange(0, T, dtype=torch.float64")],
                           "position offset"),
    "cache holds the repeated heads": ([("        present = (k, v)\n", ""), (REPEAT, REPEAT + "\n        present = (k, v)")],
                                       "the cache keeps the n_kv_head"),
    "keys not rotated": ([("q, k = rotate(q), rotate(k)", "q = rotate(q)")], "attention, without a cache"),
    "values rotated too": ([("q, k = rotate(q), rotate(k)", "q, k, v = rotate(q), rotate(k), rotate(v)")],
                           "attention, without a cache"),
    "no 1/sqrt(head_dim) scale": ([(" / math.sqrt(self.head_dim)", "")], "attention, without a cache"),
    "frequencies over the model width": ([("/ self.head_dim)\n", "/ (self.n_head * self.head_dim))\n")],
                                         "attention, without a cache"),
    "rope_base ignored": ([("theta = self.rope_base **", "theta = 10000.0 **")], "attention, without a cache"),
    "top-left mask with a cache": ([(".tril(diagonal=t_past)", ".tril(diagonal=0)")], "4 new tokens after a cache of 3"),
    "biased lm_head": ([("nn.Linear(config.n_embd, config.vocab_size, bias=False)",
                         "nn.Linear(config.n_embd, config.vocab_size)")], "no biases"),
    "tied head": ([("        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)\n",
                    "        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)\n"
                    "        self.lm_head.weight = self.embed_tokens.weight\n")], "not tied"),
    "post-norm block": ([("        y, present = self.self_attn(self.input_layernorm(x), past)\n        x = x + y\n"
                          "        h = self.post_attention_layernorm(x)\n"
                          "        return x + self.mlp.w_down(F.silu(self.mlp.w_gate(h)) * self.mlp.w_up(h)), present",
                          "        y, present = self.self_attn(x, past)\n        x = self.input_layernorm(x + y)\n"
                          "        m = self.mlp.w_down(F.silu(self.mlp.w_gate(x)) * self.mlp.w_up(x))\n"
                          "        return self.post_attention_layernorm(x + m), present")], "LlamaForCausalLM"),
    "no final norm": ([("return self.lm_head(self.norm(x)), presents", "return self.lm_head(x), presents")],
                      "LlamaForCausalLM"),
    "eps ignored": ([("eps=config.norm_eps", "eps=1e-6")], ""),  # hidden only: eps 1e-5 and 0.05
    "SiLU on the up branch": ([("F.silu(self.mlp.w_gate(h)) * self.mlp.w_up(h)", "self.mlp.w_gate(h) * F.silu(self.mlp.w_up(h))")],
                              "LlamaForCausalLM"),
    "past not passed to the layers": ([("layer(x, None if past is None else past[i])", "layer(x, None)")],
                                      "fed after a cache of 5"),
}


@pytest.mark.parametrize("name", EX8_CORRECT)
def test_ex8_correct_alternatives_get_full_marks(name):
    NB.assert_full_marks("ex8", EX8_CORRECT[name])


@pytest.mark.parametrize("name", EX8_WRONG)
def test_ex8_mistakes_lose_points(name):
    check_mistake("ex8", *EX8_WRONG[name])


def test_ex8_each_class_costs_only_its_own_cell():
    """A wrong block (post-norm) keeps the attention's points; a wrong attention loses both cells."""
    replacements, _ = EX8_WRONG["post-norm block"]
    outcome = NB.run("ex8", mutate("ex8", *replacements))
    assert outcome.earned == {"ex8_test_attention": 4.0, "ex8_test_llama": 0.0}


# ---------------------------------------------------------------------------------------------
# Shortcuts: a library call, PyTorch's own version or the course's helper instead of the idea.
# Each row must earn nothing on every test cell of its exercise (tests/test_shortcuts_every_phase.py).
# ---------------------------------------------------------------------------------------------

SHORTCUTS = {
    "ex1": {
        "transformers' rotary embedding computes the angles": '''
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def sinusoidal_positions(n_positions, d_model, base=10000.0):
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=d_model, num_attention_heads=1, head_dim=d_model,
                                              rope_theta=base))
    cos, sin = rotary(torch.zeros(1, n_positions, d_model), torch.arange(n_positions)[None])
    half = d_model // 2
    return torch.stack([sin[0, :, :half], cos[0, :, :half]], dim=-1).flatten(1).float()
''',
        "DistilBERT's sinusoidal table (base 10000 only)": '''
from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings


def sinusoidal_positions(n_positions, d_model, base=10000.0):
    out = torch.empty(n_positions, d_model)
    create_sinusoidal_embeddings(n_positions, d_model, out)
    return out
''',
    },
    "ex2": {
        "transformers' apply_rotary_pos_emb, features permuted to rotate-half order": '''
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * theta
    angles = torch.cat([angles, angles], dim=-1)
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # pairs (2i, 2i+1) -> (i, i + d/2)
    halves = x[..., order]
    rotated, _ = apply_rotary_pos_emb(halves, halves, angles.cos().to(x.dtype), angles.sin().to(x.dtype), unsqueeze_dim=0)
    return rotated.reshape(x.shape)[..., torch.argsort(order)]
''',
        "the course's reference apply_rope": '''
def apply_rope(x, positions, base=10000.0):
    return tx.apply_rope(x, positions, base)
''',
    },
    "ex3": {
        "F.group_norm with one group, and transformers' LlamaRMSNorm": EX3_HEADER.format(ln='''
        tokens = x.reshape(-1, 1, x.shape[-1])  # one group of one channel per token
        return F.group_norm(tokens, 1, eps=self.eps).reshape(x.shape) * self.weight + self.bias''', rms='''
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        norm = LlamaRMSNorm(x.shape[-1], eps=self.eps)
        norm.weight = self.weight
        return norm(x)'''),
        "nn.LayerNorm's functional, and the course's tx.RMSNorm": EX3_HEADER.format(ln='''
        return torch.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)''', rms='''
        norm = tx.RMSNorm(x.shape[-1], eps=self.eps)
        norm.weight = self.weight
        return norm(x)'''),
    },
    "ex4": {
        "transformers' LlamaMLP with the same layers": '''
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP


class SwiGLU(nn.Module):
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x):
        mlp = LlamaMLP(LlamaConfig(hidden_size=self.w_gate.in_features, intermediate_size=self.w_gate.out_features,
                                   num_attention_heads=1))
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = self.w_gate, self.w_up, self.w_down
        return mlp(x)
''',
    },
    "ex5": {
        "the course's reference Block and GPT behind the exercise's attribute names": NB.solution_source("ex5").split(
            "class Block(nn.Module):")[0] + '''
class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        reference = tx.Block(tx.GPTConfig(n_embd=n_embd, n_head=n_head))
        self.ln_1, self.ln_2 = reference.ln_1, reference.ln_2
        self.attn, self.mlp = CausalSelfAttention(n_embd, n_head), MLP(n_embd)
        reference.attn.c_attn, reference.attn.c_proj = self.attn.c_attn, self.attn.c_proj
        reference.mlp.c_fc, reference.mlp.c_proj = self.mlp.c_fc, self.mlp.c_proj
        object.__setattr__(self, "_reference", reference)   # hidden from named_modules

    def forward(self, x, causal=True):
        return self._reference(x) if causal else x + self.mlp(self.ln_2(x + self.attn(self.ln_1(x), False))) + \\
            self.attn(self.ln_1(x), False)
''' + EX5_REFERENCE_GPT,
    },
    "ex6": {
        "the reference GPT built on the meta device": '''
def gpt_num_params(vocab_size, block_size, n_layer, n_embd, bias=True, tied=True):
    with torch.device("meta"):
        model = tx.GPT(tx.GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=1,
                                    n_embd=n_embd, bias=bias))
    return model.num_parameters() + (0 if tied else vocab_size * n_embd)
''',
        "transformers' GPT-2 on the meta device": '''
def gpt_num_params(vocab_size, block_size, n_layer, n_embd, bias=True, tied=True):
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer,
                                           n_embd=n_embd, n_head=1, tie_word_embeddings=tied))
    return sum(p.numel() for p in model.parameters())
''',
        "a stack of plain nn.Linear and nn.LayerNorm modules, counted": '''
def gpt_num_params(vocab_size, block_size, n_layer, n_embd, bias=True, tied=True):
    with torch.device("meta"):
        block = [nn.LayerNorm(n_embd, bias=bias), nn.Linear(n_embd, 3 * n_embd, bias=bias), nn.Linear(n_embd, n_embd, bias=bias),
                 nn.LayerNorm(n_embd, bias=bias), nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.Linear(4 * n_embd, n_embd, bias=bias)]
        per_block = sum(p.numel() for m in block for p in m.parameters())
        final = sum(p.numel() for p in nn.LayerNorm(n_embd, bias=bias).parameters())
    return (vocab_size + block_size) * n_embd + n_layer * per_block + final + (0 if tied else vocab_size * n_embd)
''',
    },
    "ex7": {
        "the reference attention with a KVCache, and the reference GPT's generate": '''
class CachedSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.dropout, self.resid_dropout = 0.0, nn.Identity()

    def forward(self, x, past=None):
        cache = tx.KVCache(1)
        cache.layers[0] = past
        y = tx.CausalSelfAttention.forward(self, x, cache, 0)
        return y, cache.layers[0]


@torch.no_grad()
def generate(model, idx, max_new_tokens, use_cache=True):
    return model.gpt.generate(idx, max_new_tokens, temperature=0)
''',
    },

    "ex8": {
        "transformers' repeat_kv for the grouping": NB.solution_source("ex8").replace(
            "k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)",
            "from transformers.models.llama.modeling_llama import repeat_kv\n"
            "        k, v = repeat_kv(k, group), repeat_kv(v, group)"),
        "F.scaled_dot_product_attention with enable_gqa=True": NB.solution_source("ex8").replace(
            "        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)\n", "").replace(
            "        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)\n", "").replace(
            "        weights = scores.masked_fill(~allowed, float(\"-inf\")).softmax(dim=-1)\n"
            "        y = (weights @ v)",
            "        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)"),
        "the course's reference attention, RMSNorm and SwiGLU": EX8_ATTENTION_INIT + """
    def forward(self, x, past=None):
        return llama.attention_reference(x, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                                         self.o_proj.weight, self.n_head, self.n_kv_head, self.rope_base, past)


class LlamaBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = tx.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.self_attn = GroupedQueryAttention(config.n_embd, config.n_head, config.n_kv_head, config.rope_base)
        self.post_attention_layernorm = tx.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = llama.SwiGLU(config.n_embd, config.d_hidden)

    def forward(self, x, past=None):
        y, present = self.self_attn(self.input_layernorm(x), past)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), present


class Llama(llama.Llama):
    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.norm = tx.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
""",
        "the course's tx.apply_rope for the rotations": NB.solution_source("ex8").replace(
            "        q, k = rotate(q), rotate(k)\n",
            "        q, k = tx.apply_rope(q, torch.arange(t_past, t_past + T), self.rope_base), "
            "tx.apply_rope(k, torch.arange(t_past, t_past + T), self.rope_base)\n"),
    },
}
