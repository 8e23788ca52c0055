"""utils.handles: objects of the student's classes recorded by handle in the verifier, and stood in for in the judge."""

import math

import pytest
import torch
from torch import nn

from utils import replay, transcript
from utils.checks import plain

STUDENT = '''
class Norm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.weight + self.bias


class Tiny(nn.Module):
    def __init__(self, vocab, d):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Norm(d), Norm(d)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight          # tied

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Adapter(nn.Module):
    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling = alpha / r
        self.merged = False

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.A.T) @ self.B.T

    def merge(self):
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.scaling * self.B @ self.A
            self.merged = True


class Pages:
    def __init__(self, blocks, size):
        self.size = size
        self.pages = torch.zeros(blocks, size, 2)
        self.free_blocks = list(range(blocks))
        self.tables, self.lengths = {}, {}

    def append(self, seq, k):
        table = self.tables.setdefault(seq, [])
        n = self.lengths.get(seq, 0)
        if n == len(table) * self.size:
            if not self.free_blocks:
                raise MemoryError("full")
            table.append(self.free_blocks.pop(0))
        self.pages[table[n // self.size], n % self.size] = k
        self.lengths[seq] = n + 1

    def free(self, seq):
        self.free_blocks.extend(self.tables.pop(seq))
        del self.lengths[seq]


class Scaled(nn.Module):
    factor = 2.0

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    @property
    def doubled(self):
        return self.w * self.factor

    @staticmethod
    def shifted(x):
        return x + 1

    def forward(self, x):
        return x * self.w * self.factor


class Delegates(nn.Module):
    def __getattr__(self, name):
        return super().__getattr__(name)


class Decay:
    def __init__(self, params, lr):
        self.param_groups = [{"params": list(params), "lr": lr}]

    def step(self):
        with torch.no_grad():
            for p in self.param_groups[0]["params"]:
                p.sub_(self.param_groups[0]["lr"] * (p.grad + p))
'''


class Foreign(nn.Identity):
    """A module of a library other than torch and the course's."""


def student_classes(source=STUDENT):
    namespace = {"__name__": "__main__", "torch": torch, "nn": nn, "math": math, "Foreign": Foreign}
    exec(compile(source, "<student cell 1>", "exec"), namespace)
    return {name: value for name, value in namespace.items() if isinstance(value, type) and is_student_class(value)}


def is_student_class(cls):
    return any(isinstance(v, type(is_student_class)) and v.__code__.co_filename.startswith("<student")
               for base in cls.__mro__ for v in vars(base).values())


def record_and_replay(test, source=STUDENT, forge=None):
    """``test(classes)`` with the student's classes recorded, then with their stand-ins built from
    the record (``forge`` may change the record first); both results and whether every call was used."""
    classes = student_classes(source)
    recorder = replay.Recorder(plain, is_student_class)
    transcript.HANDLES = recorder.handles
    try:
        torch.manual_seed(0)
        first = test({name: recorder.handles.recording_class(cls) for name, cls in classes.items()})
    finally:
        transcript.HANDLES = None
    calls = transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]
    if forge:
        forge(calls)
    replayed = replay.Replay(calls)
    transcript.HANDLES = replayed.handles
    try:
        torch.manual_seed(0)
        stand_ins = {name: stand_in(replayed, recorder, cls) for name, cls in classes.items()}
        second = test(stand_ins)
    finally:
        transcript.HANDLES = None
    return first, second, replayed.finished()


def stand_in(replayed, recorder, cls):
    """What the judge binds to a student's class name (autograde/judge_harness.py)."""
    try:
        return replayed.handles.stand_in_class(*recorder.handles.describe(cls))
    except transcript.Opaque as error:
        why = str(error)

        def unavailable(*args, **kwargs):
            raise replay.Undecidable(why)
        return unavailable


def norm_test(classes):
    g = torch.Generator().manual_seed(1)
    norm = classes["Norm"](6, eps=1e-3)
    assert isinstance(norm, nn.Module) and type(norm).__name__ == "Norm" and type(norm).__module__ == "__main__"
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g))     # the test's own change, on the judge's stand-in too
    x = torch.randn(2, 3, 6, generator=g, requires_grad=True)
    out = plain(norm(x))
    expected = nn.functional.layer_norm(x, (6,), norm.weight, norm.bias, eps=1e-3)
    assert torch.allclose(out, expected, atol=1e-5)
    (out * torch.arange(6.0)).sum().backward()
    return out.detach(), x.grad, norm.weight.grad, norm.bias.grad, norm.double()(x.double()).dtype


def test_a_module_of_the_student_s_class_is_replayed_by_a_stand_in():
    first, second, finished = record_and_replay(norm_test)
    assert finished
    for a, b in zip(first, second):
        assert a == b if isinstance(a, torch.dtype) else torch.allclose(a, b)


def test_nested_modules_tied_weights_and_kept_arguments_are_rebuilt():
    def test(classes):
        model = classes["Tiny"](11, 4)
        assert model.head.weight is model.wte.weight, "the tie"
        assert type(model.blocks[1]).__name__ == "Norm"
        logits = plain(model(torch.tensor([[1, 2, 3]])))
        logits.sum().backward()
        base = nn.Linear(4, 3)
        adapter = classes["Adapter"](base, 2, 4.0)
        assert adapter.base is base and not base.weight.requires_grad
        with torch.no_grad():
            adapter.B.copy_(torch.ones(3, 2))
        adapter.merge()
        return (logits.detach(), model.wte.weight.grad, sum(p.numel() for p in model.parameters()),
                base.weight.detach().clone(), adapter.merged)

    first, second, finished = record_and_replay(test)
    assert finished and first[2] == second[2] and first[4] is second[4] is True
    for index in (0, 1, 3):
        assert torch.allclose(first[index], second[index])


def test_a_plain_object_s_state_follows_each_call():
    def test(classes):
        pages = classes["Pages"](3, 2)
        for step, seq in enumerate("aabba"):
            pages.append(seq, torch.full((2,), float(step)))
        pages.free("a")
        for _ in range(4):
            pages.append("c", torch.ones(2))
        with pytest.raises(MemoryError):
            pages.append("c", torch.ones(2))
        return dict(pages.tables), list(pages.free_blocks), dict(pages.lengths), pages.pages.clone()

    first, second, finished = record_and_replay(test)
    assert finished and first[:3] == second[:3] == ({"b": [1], "c": [0, 2]}, [], {"b": 2, "c": 4})
    assert torch.equal(first[3], second[3])


def test_an_object_keeps_the_test_s_own_tensors():
    """An optimizer holds the test's parameters: its step must change the judge's tensors."""
    def test(classes):
        p = torch.tensor([1.0, -2.0], requires_grad=True)
        optimizer = classes["Decay"]([p], lr=0.1)
        for _ in range(2):
            p.grad = torch.ones(2)
            optimizer.step()
        return p.detach().clone()

    first, second, finished = record_and_replay(test)
    assert finished and torch.allclose(first, second) and not torch.equal(second, torch.tensor([1.0, -2.0]))


def test_a_forged_record_fails_the_judge_s_own_checks():
    def forge_output(calls):
        for call in calls:
            if call["name"] == "Norm.forward":
                tag, value, grad_flag, grad = call["result"]
                call["result"] = (tag, value * 1.01, grad_flag, grad)

    with pytest.raises(AssertionError):
        record_and_replay(norm_test, forge=forge_output)

    def forge_weights(calls):
        """The recorded object's weights at the call differ from what the test put in the stand-in."""
        for call in calls:
            if call["name"] == "Norm.forward":
                handle = call["args"][1][0][1][0]
                attrs, params = handle[5], handle[6]
                name, (tag, weight, flag, grad) = params[0]
                params[0] = (name, (tag, weight + 1, flag, grad))

    with pytest.raises(replay.Mismatch):
        record_and_replay(norm_test, forge=forge_weights)


def test_a_stand_in_is_built_only_from_data():
    handles = replay.Replay([]).handles
    module = ("torch.nn.modules.module", "Module")
    for tree in (("handle", 0, "x y", module, [], [], [], [], []),
                 ("handle", 0, "Norm", ("os", "system"), [], [], [], [], []),
                 ("handle", 0, "Norm", module, [("method", "__init__; import os")], [], [], [], []),
                 ("handle", 0, "Norm", module, [("method", "__getattribute__")], [], [], [], []),
                 ("handle", 0, "Norm", module, [("constant", "eps", ("tensor", torch.zeros(1)))], [], [], [], []),
                 ("handle", 5, "Norm", module, [], [], [], [], []),
                 ("handle", 0, "Norm", module, [], [], [], [], [("m", ("torchmodule", "os", "system", [], [], [], []))])):
        with pytest.raises(ValueError):
            handles.decode(tree)


def test_properties_static_methods_and_class_constants_are_replayed_too():
    def test(classes):
        scaled = classes["Scaled"]()
        return (scaled.factor, plain(scaled.doubled).detach(), classes["Scaled"].shifted(1.5),
                plain(scaled(torch.arange(3.0))).detach())

    first, second, finished = record_and_replay(test)
    assert finished and first[0] == second[0] == 2.0 and first[2] == second[2] == 2.5
    assert torch.equal(first[1], second[1]) and torch.equal(first[3], second[3])


def test_an_object_a_stand_in_cannot_mimic_leaves_the_test_to_a_person():
    """A class with __getattr__ (a stand-in could not answer its reads alike): undecided, never failed."""
    with pytest.raises(replay.Undecidable):
        record_and_replay(lambda classes: classes["Delegates"]())


def test_an_attribute_that_cannot_cross_is_left_out_on_both_sides_alike():
    """An object holding one it cannot write down (a student's module around a module of a library
    the judge does not import) leaves that attribute out; the numbering of the objects written
    later stays the same on both sides."""
    source = STUDENT + '''
class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Foreign()

    def forward(self, x):
        return self.inner(x)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.extra = [Wrapper()]
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return x * self.w
'''

    def test(classes):
        holder = classes["Holder"]()
        norm = classes["Norm"](2)
        return plain(holder(torch.ones(2))).detach(), plain(norm(torch.arange(2.0))).detach()

    first, second, finished = record_and_replay(test, source)
    assert finished and all(torch.equal(a, b) for a, b in zip(first, second))


def test_forward_hooks_the_test_put_on_inner_layers_fire_in_the_judge_too():
    """Phase 2's tests count, with forward hooks, which layers of the student's model ran: the
    layers' calls inside the student's forward are recorded (for hooked layers only) and the
    judge fires its own layers' hooks with what they received and returned."""
    def test(classes):
        model = classes["Tiny"](11, 4)
        ran, outputs = [], []

        def seen(module, args, out, name):
            ran.append(name)
            outputs.append(out)

        for name, layer in model.named_modules():
            if name:
                layer.register_forward_hook(lambda m, args, out, name=name: seen(m, args, out, name))
        model.blocks[0].register_forward_pre_hook(lambda m, args: ran.append("before blocks.0"))
        logits = plain(model(torch.tensor([[1, 2, 3]])))
        return logits, ran, outputs

    first, second, finished = record_and_replay(test)
    assert finished and torch.allclose(first[0], second[0])
    assert first[1] == second[1] == ["wte", "before blocks.0", "blocks.0", "blocks.1", "head"]
    assert all(torch.allclose(a, b) for a, b in zip(first[2], second[2]))


def test_a_course_model_rebuilt_in_place_is_rebuilt_in_the_judge_too():
    """Phase 5's vocabulary resize: the student's function replaces a course GPT's embedding and
    head with larger ones, tied; the judge's own model gets the new weights, the tie and the new
    sizes (its modules are recorded by their parts, not only by their tensors)."""
    from utils.transformer import GPT, GPTConfig

    def grow(model, new_vocab):
        old = model.transformer.wte.weight
        wte = nn.Embedding(new_vocab, old.shape[1])
        with torch.no_grad():
            wte.weight[:old.shape[0]] = old
            wte.weight[old.shape[0]:] = old.mean(0)
        model.transformer.wte = wte
        model.lm_head = nn.Linear(old.shape[1], new_vocab, bias=False)
        model.lm_head.weight = wte.weight
        model.config.vocab_size = new_vocab
        return model

    def test(grow):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8)).eval()
        assert grow(model, 24) is model
        logits = model(torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(1)))[0]
        return (logits.detach(), model.lm_head.weight is model.transformer.wte.weight,
                model.transformer.wte.num_embeddings, model.config.vocab_size)

    recorder = replay.Recorder(plain, is_student_class)
    transcript.HANDLES = recorder.handles
    try:
        first = test(recorder.wrap(grow, "grow"))
    finally:
        transcript.HANDLES = None
    calls = transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]
    judge = replay.Replay(calls)
    transcript.HANDLES = judge.handles
    try:
        second = test(judge.stub("grow"))
    finally:
        transcript.HANDLES = None
    assert judge.finished() and torch.allclose(first[0], second[0]) and first[0].shape[-1] == 24
    assert first[1:] == second[1:] == (True, 24, 24)


TEST_ADAPTER = '''
class TestAdapter(nn.Module):
    def __init__(self, base, r=2):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T
'''


def test_layers_wrapped_in_the_tests_own_class_stay_the_judges_own_layers():
    """Phase 5's add_lora: the test hands the student's function a class of its own (or a function
    making one); the student's code wraps layers of the test's model in it. The judge builds the
    same wrappers around its own layers (the very objects, as the test checks with ``is``)."""
    from utils.transformer import GPT, GPTConfig

    def add_lora(model, targets, make):
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
        for name, layer in found:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(layer))
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[-1].startswith("lora_"))
        return model

    def test(add_lora, namespace):
        adapter = namespace["TestAdapter"]
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))
        originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        add_lora(model, {"c_attn"}, adapter)
        made = []
        add_lora(model, ("c_fc",), lambda layer: made.append(layer) or adapter(layer, 1))
        wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, adapter))
        same_layers = all(model.get_submodule(n).base is originals[n] for n in wrapped)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return wrapped, same_layers, trainable, [any(m is o for o in originals.values()) for m in made]

    def namespace():
        ns = {"__name__": "__main__", "torch": torch, "nn": nn}
        exec(compile(TEST_ADAPTER, "<test ex5>", "exec"), ns)
        return ns

    recorder = replay.Recorder(plain, is_student_class)
    transcript.HANDLES = recorder.handles
    try:
        first = test(recorder.wrap(add_lora, "add_lora"), namespace())
    finally:
        transcript.HANDLES = None
    calls = transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]
    judge = replay.Replay(calls)
    judge.handles.namespace = namespace()
    transcript.HANDLES = judge.handles
    try:
        second = test(judge.stub("add_lora"), judge.handles.namespace)
    finally:
        transcript.HANDLES = None
    assert judge.finished() and first == second
    assert len(second[0]) == 4 and second[1] is True and all(second[3]) and len(second[3]) == 2
    assert all(n.endswith(("lora_A", "lora_B")) for n in second[2]) and len(second[2]) == 8
