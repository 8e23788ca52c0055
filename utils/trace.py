"""The operators a student's call ran, as data, for the tests that watch operators.

Some tests grade *how* a result is computed by watching PyTorch's operators with one of the
course's dispatch modes (``Watching``): the reads of tiled attention (``attention.TiledReads``),
the largest new tensor (``attention.NewMemory``, ``checks.LargestTensor``), the peak memory of a
step (``memory_accounting.PeakMemory``), operators switched off (``checks.shortcuts_off(ops=...)``)
and integer-only matrix products (``quantization.integer_matmuls_only``). While one is on, the
verifier records each call into the student's code with its *trace*: every ``aten`` operator it
ran, its arguments as references (a tensor of the call's arguments, an output of an earlier
operator, or the value of a tensor first met there) and constants. The judge runs the trace again
on its own arguments, under the test's own modes, before handing back the recorded result: the
modes count reads and bytes of operators the judge itself ran, a switched-off operator in the
trace fails the test there, and the result must be what the trace computes -- an operator the
recorder did not see (a computation that escaped the dispatch modes) leaves the result unexplained,
and the test to a person.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from utils import handles as _handles
from utils.transcript import Opaque, map_tensors, same, unseen

# How many of the course's watching modes are on (the verifier records traces only then).
_watching = [0]
# A trace longer than this is not recorded (the test is left to a person).
LONGEST = 200_000


class Watching(TorchDispatchMode):
    """Base of the course's dispatch modes that watch the student's operators: while one is on,
    each call a test makes into the student's code is recorded with its operator trace."""

    def __enter__(self):
        _watching[0] += 1
        try:
            return super().__enter__()
        except BaseException:
            _watching[0] -= 1
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            _watching[0] -= 1


def watched() -> bool:
    """Whether a test is watching operators now."""
    return _watching[0] > 0


_SCALARS = (bool, int, float, complex, str, type(None))
# Operators that compute nothing (the profiler's marks around ``optimizer.step``): left out of a trace.
_BOOKKEEPING = ("profiler",)
# Operators the judge never runs from a record: they read or write files or the console, move a
# tensor onto other memory, or index without checking bounds. A call that ran one is left to a person.
_REFUSED = ("from_file", "_print", "set_", "set", "resize_", "resize_as_", "_resize_output_", "record_stream",
            "_unsafe_index", "_unsafe_index_put", "_unsafe_masked_index", "_unsafe_masked_index_put_accumulate")
_NAMED = {torch.dtype: "dtype", torch.device: "device", torch.layout: "layout", torch.memory_format: "format"}


def _named(kind: str, name: str):
    """A dtype, device, layout or memory format from its recorded name (untrusted: looked up, never evaluated)."""
    if kind == "device":
        return torch.device(name)
    value = getattr(torch, name.removeprefix("torch."), None)
    if type(value) is not {"dtype": torch.dtype, "layout": torch.layout, "format": torch.memory_format}[kind]:
        raise ValueError("an unknown name in a trace")
    return value


# ---------------------------------------------------------------------------
# The verifier's side
# ---------------------------------------------------------------------------

class Trace(TorchDispatchMode):
    """Records the operators run inside it (see the module docstring). ``problem`` says why the
    trace cannot be replayed; ``communicated`` that a collective ran (the traffic, ``utils/traffic.py``,
    is then what crosses: a trace would read buffers another rank filled)."""

    def __init__(self, args, kwargs):
        super().__init__()
        self.paths = _handles.argument_paths(args, kwargs)
        # id(tensor) -> (weak reference to it, its reference in the trace): weak, so that the
        # trace keeps no tensor alive longer than the student's code does.
        self.refs: dict[int, tuple] = {}
        self.ops: list = []
        self.consts: list = []
        self.problem: str | None = None
        self.communicated = False

    def _known(self, tensor):
        known = self.refs.get(id(tensor))
        return known[1] if known is not None and known[0]() is tensor else None

    def _reference(self, tensor):
        known = self._known(tensor)
        if known is not None:
            return known
        found = self.paths.get(id(tensor))
        if found is not None and found[0] is tensor:
            reference = ("arg", found[1])
        else:
            if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
                raise Opaque(f"an operator on a {type(tensor).__name__}")
            with unseen():
                self.consts.append(tensor.detach().clone())
            reference = ("const", len(self.consts) - 1)
        self.refs[id(tensor)] = (weakref.ref(tensor), reference)
        return reference

    def _encode(self, value):
        if isinstance(value, torch.Tensor):
            return ("t", self._reference(value))
        if type(value) in _SCALARS:
            return ("v", value)
        if type(value) in (list, tuple):
            return (type(value).__name__, [self._encode(item) for item in value])
        if type(value) in _NAMED:
            return (_NAMED[type(value)], str(value))
        if type(value) is torch.Generator:
            return ("generator", value.get_state())
        raise Opaque(type(value).__name__)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = getattr(func, "namespace", "")
        if namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            self.communicated = True
        record = None
        if namespace in _BOOKKEEPING:
            pass
        elif self.problem is None and not self.communicated:
            if namespace != "aten" or func.overloadpacket.__name__ in _REFUSED or len(self.ops) >= LONGEST:
                self.problem = "a trace too long" if len(self.ops) >= LONGEST else f"the operator {func}"
            else:
                try:
                    record = [str(func), self._encode(list(args)), self._encode(list(kwargs.items())), None]
                    if torch.Tag.nondeterministic_seeded in func.tags:
                        record[3] = torch.get_rng_state()  # the random numbers it draws, drawn again alike
                except Opaque as error:
                    self.problem = str(error)
        result = func(*args, **kwargs)
        if record is not None and self.problem is None:
            index = len(self.ops)
            self.ops.append(tuple(record))
            for position, tensor in enumerate(t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)):
                self.refs[id(tensor)] = (weakref.ref(tensor), ("out", index, position))
        return result

    def result_refs(self, value) -> list | None:
        """The references of the tensors in a call's result (in ``map_tensors`` order), None for
        one no recorded operator produced."""
        flat = []
        map_tensors(flat.append, value)
        refs = []
        for tensor in flat:
            known = self._known(tensor)
            if known is not None:
                refs.append(known)
            else:
                found = self.paths.get(id(tensor))
                refs.append(("arg", found[1]) if found is not None and found[0] is tensor else None)
        return refs

    def record(self, value) -> dict | None:
        """The trace as data, or None when there is none to replay (a collective ran)."""
        if self.communicated:
            return None
        return {"ops": self.ops, "consts": self.consts, "result": self.result_refs(value)}


# ---------------------------------------------------------------------------
# The judge's side
# ---------------------------------------------------------------------------

def _operator(name):
    """The ``aten`` operator a trace names (``aten.mm.default``), found by attribute, never evaluated."""
    parts = name.split(".") if type(name) is str else []
    if len(parts) != 3 or parts[0] != "aten" or not all(p.isidentifier() for p in parts[1:]) or parts[1] in _REFUSED:
        raise ValueError("a trace names an operator outside aten, or one the judge does not run")
    packet = getattr(torch.ops.aten, parts[1], None)
    operator = getattr(packet, parts[2], None) if packet is not None else None
    if not isinstance(operator, torch._ops.OpOverload):
        raise ValueError("a trace names an unknown operator")
    return operator


def run(trace, args, kwargs) -> list:
    """Run a recorded trace on the judge's ``args`` and ``kwargs`` (as they are when the call
    starts) under the test's dispatch modes. Returns what it computed for each tensor of the
    result (None where no recorded operator produced it), for ``check``. ``ValueError`` for a
    malformed trace."""
    if type(trace) is not dict or type(trace.get("ops")) is not list or type(trace.get("consts")) is not list \
            or type(trace.get("result")) is not list or any(type(c) is not torch.Tensor for c in trace["consts"]):
        raise ValueError("the recorded trace is malformed")
    with unseen():  # the values first met in the student's call existed before it: not new memory
        consts = [c.clone() for c in trace["consts"]]
    outputs: list[list] = []
    # Each output is let go after the last operator that reads it, as the student's code let it go
    # (the test's modes may watch memory); the result's are kept.
    last_use: dict = {}
    for index, op in enumerate(trace["ops"]):
        for reference in _outputs_read(op):
            last_use[reference] = index
    kept = {tuple(r[1:]) for r in trace["result"] if type(r) is tuple and len(r) == 3 and r[0] == "out"}
    release: dict[int, list] = {}  # operator index -> the outputs to let go after it

    def tensor(reference):
        if type(reference) is not tuple or not reference:
            raise ValueError("a malformed reference in a trace")
        if reference[0] == "arg" and len(reference) == 2:
            found = _handles.at(args, kwargs, reference[1])
            if not isinstance(found, torch.Tensor):
                raise ValueError("a trace names an argument that is not a tensor")
            return found
        if reference[0] == "out" and len(reference) == 3 and type(reference[1]) is int and type(reference[2]) is int \
                and 0 <= reference[1] < len(outputs) and 0 <= reference[2] < len(outputs[reference[1]]) \
                and outputs[reference[1]][reference[2]] is not None:
            return outputs[reference[1]][reference[2]]
        if reference[0] == "const" and len(reference) == 2 and type(reference[1]) is int \
                and 0 <= reference[1] < len(consts):
            return consts[reference[1]]
        raise ValueError("a malformed reference in a trace")

    def decode(tree):
        if type(tree) is not tuple or len(tree) != 2 or type(tree[0]) is not str:
            raise ValueError("a malformed argument in a trace")
        kind, value = tree
        if kind == "t":
            return tensor(value)
        if kind == "v" and type(value) in _SCALARS:
            return value
        if kind in ("list", "tuple") and type(value) is list:
            items = [decode(item) for item in value]
            return items if kind == "list" else tuple(items)
        if kind in ("dtype", "device", "layout", "format") and type(value) is str:
            return _named(kind, value)
        if kind == "generator" and type(value) is torch.Tensor:
            generator = torch.Generator()
            generator.set_state(value)
            return generator
        raise ValueError("a malformed argument in a trace")

    state = torch.get_rng_state()
    try:
        with torch.no_grad():
            for op in trace["ops"]:
                if type(op) is not tuple or len(op) != 4:
                    raise ValueError("a malformed operator in a trace")
                operator = _operator(op[0])
                given, named = decode(op[1]), decode(op[2])
                if type(given) is not list or type(named) is not list or any(
                        type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str for pair in named):
                    raise ValueError("a malformed operator in a trace")
                if type(op[3]) is torch.Tensor:
                    torch.set_rng_state(op[3])
                try:
                    out = operator(*given, **dict(named))
                except AssertionError:  # a test's check (an operator switched off): its verdict stands
                    raise
                except Exception as error:  # noqa: BLE001 - a forged trace: shapes that do not fit
                    raise ValueError(f"a traced {op[0]} cannot run here ({type(error).__name__})") from None
                index = len(outputs)
                outputs.append([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
                del out, given, named
                for position in range(len(outputs[index])):
                    if (index, position) not in kept:
                        release.setdefault(max(index, last_use.get((index, position), index)), []).append(
                            (index, position))
                for i, j in release.pop(index, ()):  # read by no later operator
                    outputs[i][j] = None
    finally:
        torch.set_rng_state(state)
    return [None if reference is None else tensor(reference) for reference in trace["result"]]


def _outputs_read(tree) -> list:
    """The ``(operator, position)`` outputs a recorded operator reads (a tolerant walk: ``run``
    checks the form)."""
    found, pending = [], [tree]
    while pending:
        item = pending.pop()
        if type(item) is tuple and len(item) == 2 and item[0] == "t" and type(item[1]) is tuple \
                and len(item[1]) == 3 and item[1][0] == "out":
            found.append(tuple(item[1][1:]))
        elif type(item) in (tuple, list):
            pending.extend(item)
    return found


def check(computed: list, result) -> None:
    """Whether the trace computed the call's ``result`` (the recorded one, as the judge hands it
    back): ``ValueError`` where it computed something else, ``LookupError`` for a tensor of the
    result that no operator the recorder saw produced."""
    recorded = []
    map_tensors(recorded.append, result)
    if len(computed) != len(recorded):
        raise ValueError("the trace does not match the result")
    for tensor, value in zip(computed, recorded):
        if tensor is None:
            raise LookupError("a result no operator the recorder saw produced")
        if type(value) is not torch.Tensor or not same(tensor.detach(), value.detach()):
            raise ValueError("the recorded operators do not compute the returned value")
