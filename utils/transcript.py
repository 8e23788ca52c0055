"""What a test cell exchanged with the student's functions, as plain data (``utils/replay.py``
records and replays it).

The verifier (``autograde/verify_harness.py``) records every call a test makes into a student
function; the judge (``autograde/judge_harness.py``), a process that never runs student code,
replays the test from that record. Everything crosses as a tree of tuples, built-in values and
exact tensors (``encode``), written with ``torch.save`` and read back with
``torch.load(weights_only=True)``, which builds no other class; ``decode`` then checks every node.
An object of the student's class crosses by handle (``utils/handles.py``); a value that is none of
these (a generator, a lambda) is ``Opaque``.
The course's own objects (a config, a tokenizer, a module, an optimizer) are recorded by their
data, to be compared and written back into the judge's own objects, never rebuilt from a record.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import io
import math
import pathlib
import random

import torch

# The numbering of the student's objects for the test cell being recorded or replayed
# (``utils/handles.py``): set by the verifier and the judge around each test cell.
HANDLES = None


class Callback:
    """Stands for a function of the test passed to the student's function (in the recorded arguments)."""

    def __init__(self, slot):
        self.slot = slot


class Iterated(list):
    """Stands for an iterator the test passed to a student function (a model's ``parameters()``):
    its items, read before the call; the function is handed a fresh iterator over them."""


class Mismatch(BaseException):
    """The test's calls in the judge differ from the recorded ones. A BaseException, so that a test's
    own ``except Exception`` cannot swallow it."""


class Undecidable(Mismatch):
    """The student's function returned (or left in an argument) a value that cannot cross as data:
    the judge cannot decide the test, and a person should look."""


class Opaque(Exception):
    """A value that cannot cross as plain data (its type's name is the message)."""


def _numpy():
    import sys
    return sys.modules.get("numpy")


# The largest record (base64 characters) the verifier sends the judge; the references' largest is
# 14 MB (Phase 3, masking statistics). A larger one leaves its test to a person, never failed.
LARGEST_RECORD = 48 << 20

# Arguments larger than this are recorded by a summary: they are only compared (a test's inputs are
# the judge's own), while results and arguments changed in place are recorded whole.
BRIEF_ELEMENTS = 4096


def encode(value, brief: bool = False, versions: dict | None = None):
    """``value`` as a tree of tuples, built-in scalars and exact tensors (see the module docstring).
    ``brief``: large tensors as a summary (for arguments, which are only compared). ``versions``:
    tensors whose in-place version counter is still the recorded one become ``("unchanged",)``."""
    kind = type(value)
    if HANDLES is not None and HANDLES.inside:
        reference = HANDLES.argument_slot(value)  # an object of the student's keeps an argument
        if reference is not None:
            return reference
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        grad = value.grad if value.is_leaf else None  # a function may set or clip a leaf's gradient
        if versions is not None and _unchanged(value, versions):
            return ("unchanged",)
        if brief and value.numel() > BRIEF_ELEMENTS:
            return ("summary", summary(value), bool(value.requires_grad), grad is not None)
        return ("tensor", value.detach().clone(), bool(value.requires_grad),
                None if grad is None else grad.detach().clone())
    if kind is Callback:
        return ("callback", list(value.slot))
    if kind is Iterated:
        return ("iterated", [encode(item, brief, versions) for item in value])
    if kind is torch.Generator:
        return ("generator", value.get_state())
    if value is None or kind in (bool, int, float, complex, str, bytes):
        return ("value", value)
    if kind is list:
        return ("list", [encode(item, brief, versions) for item in value])
    if kind is tuple:
        return ("tuple", [encode(item, brief, versions) for item in value])
    if kind in (set, frozenset) and all(type(item) in (bool, int, float, str, bytes) for item in value):
        # In an order both processes agree on (a set's own order depends on the process's hash seed).
        return (kind.__name__, [("value", item) for item in sorted(value, key=repr)])
    if kind is dict:
        return ("dict", _items(value, brief, versions))
    if kind is collections.OrderedDict:  # an optimizer's or a module's registry of hooks
        return ("odict", _items(value, brief, versions))
    if kind is collections.defaultdict and value.default_factory in _FACTORIES.values():  # an optimizer's state
        return ("defaultdict", value.default_factory.__name__, _items(value, brief, versions))
    if isinstance(value, tuple) and isinstance(getattr(kind, "_fields", None), tuple):
        return ("named", kind.__name__, list(kind._fields), [encode(item, brief, versions) for item in value])
    if isinstance(value, torch.dtype):
        return ("dtype", str(value).removeprefix("torch."))
    if isinstance(value, type) and (_trusted(value) or (HANDLES is not None and HANDLES.test_class(value))):
        return ("class", value.__module__, value.__qualname__)  # compared by name (an adapter's class)
    if kind is torch.Size:
        return ("size", [int(n) for n in value])
    if kind is torch.device:
        return ("device", str(value))
    if kind is slice:
        return ("slice", [encode(value.start), encode(value.stop), encode(value.step)])
    if isinstance(value, pathlib.PurePath):
        return ("path", value.name, _file(value, brief))
    if HANDLES is not None and HANDLES.owns(value):
        return HANDLES.encode(value, brief, versions)
    if _trusted(kind) and dataclasses.is_dataclass(value):
        return ("dataclass", kind.__module__, kind.__qualname__,
                [(f.name, encode(getattr(value, f.name), brief, versions)) for f in dataclasses.fields(value)])
    if isinstance(value, torch.nn.Module) and HANDLES is not None:
        try:  # by its parts, submodules and ties included (``utils/handles.py``)
            return HANDLES.encode_module(value, brief, versions)
        except Opaque:
            pass
    if isinstance(value, torch.nn.Module) and (_trusted(kind) or HANDLES is not None):
        # Compared and written back by its tensors, its modes (train or eval) and its own attributes
        # that are plain data (a log of its calls); the judge holds its own object of the same class
        # (the course's, torch's, or one the test defines: the student's cross by handle, above).
        return ("module", kind.__module__, kind.__qualname__, encode(module_tensors(value), brief, versions),
                [bool(module.training) for module in value.modules()],
                _attributes(value, MODULE_INTERNALS, brief, versions))
    if _trusted(kind) and callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        # An optimizer or a learning-rate schedule: compared and written back by its state.
        return ("stateful", kind.__module__, kind.__qualname__, encode(value.state_dict()))
    if _trusted(kind) and isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, type):
        # Any other object of the course's (a tokenizer): its attributes that are plain data.
        return ("object", kind.__module__, kind.__qualname__, _attributes(value, (), brief, versions))
    np = _numpy()
    if np is not None and kind is np.ndarray and value.dtype.kind in "biufc":
        return ("ndarray", value.dtype.str, list(value.shape), np.ascontiguousarray(value).tobytes())
    if np is not None and isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return ("npscalar", value.dtype.str, value.tobytes())
    raise Opaque(kind.__name__)


_FACTORIES = {"dict": dict, "list": list, "int": int, "float": float}
# What every ``nn.Module`` holds in its ``__dict__`` (its registries of tensors, submodules and hooks).
MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))


# A file the test names by a path (a checkpoint): recorded by its content up to this size.
LARGEST_FILE = 16 << 20


def _file(path, brief: bool):
    """What the file at ``path`` holds: its bytes (a digest when ``brief``: arguments are only
    compared), None when there is no file. The test's folders have other names in the judge (a
    temporary directory): a path is compared by its last part and by what the file holds."""
    path = pathlib.Path(path)
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > LARGEST_FILE:
            raise Opaque("a file over 16 MB")
        content = path.read_bytes()
    except OSError:
        return None
    return ("sha256", hashlib.sha256(content).hexdigest()) if brief else content


def _attributes(value, internals, brief, versions) -> list:
    """(name, encoding) of an object's own attributes that are plain data, ``internals`` left out."""
    attributes = []
    for key, item in vars(value).items():
        if key in internals:
            continue
        try:
            attributes.append((key, encode(item, brief, versions)))
        except Opaque:
            pass
    return attributes


def _items(value: dict, brief: bool, versions) -> list:
    """A dict's (key, value) trees. A tensor key stands for that very tensor (an optimizer's state
    per parameter): it crosses only as a reference to an argument (``utils/handles.py``), never as
    a copy, which the judge would hold as another key."""
    items = []
    for key, item in value.items():
        if isinstance(key, torch.Tensor):
            reference = HANDLES.argument_slot(key) if HANDLES is not None else None
            if reference is None:
                raise Opaque("dict with tensor keys")
            items.append((reference, encode(item, brief, versions)))
        else:
            items.append((encode(key), encode(item, brief, versions)))
    return items


def summary(tensor) -> torch.Tensor:
    """A large tensor's fingerprint: its dtype and shape are compared apart; this holds its sum, the
    sum of its absolute values and 256 entries spread over it, in float64."""
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    flat = flat.to(torch.float64)
    picks = flat[torch.linspace(0, flat.numel() - 1, 256).long()]
    return torch.cat([torch.tensor([float(tensor.numel())], dtype=torch.float64), flat.sum().reshape(1),
                      flat.abs().sum().reshape(1), picks])


def module_tensors(module) -> dict:
    """A module's parameters and buffers by name (the objects themselves, gradients and all)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _unchanged(tensor, versions: dict) -> bool:
    seen = versions.get(id(tensor))
    if seen is None or seen[0] is not tensor or seen[1] != tensor._version or seen[4] != tensor.requires_grad:
        return False
    grad = tensor.grad if tensor.is_leaf else None
    # Exactly equal: a step of 1e-7 through ``w.data`` is a change the judge must get too (a NaN
    # counts as changed, which only costs a full copy).
    return seen[2] is grad and (grad is None or seen[3] == grad._version) and torch.equal(seen[5], _fingerprint(tensor))


def _fingerprint(tensor):
    """What a tensor holds, to tell a change its version counter does not count (``w.data += d``):
    the tensor itself when small, else its summary."""
    with torch.no_grad():
        if tensor.numel() <= BRIEF_ELEMENTS:
            return tensor.detach().clone()
        return summary(tensor)


def tensors_in(value):
    """The tensors in ``value`` (lists, tuples, dicts, a module's parameters and buffers), in an
    order the verifier and the judge compute alike."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from module_tensors(value).values()
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif type(value) is dict:
        for item in value.values():
            yield from tensors_in(item)


def versions_of(value) -> dict:
    """The in-place version counters (and gradients) of the tensors in ``value``: what ``encode(...,
    versions=)`` needs to tell an argument the call left alone."""
    found = {}
    for tensor in tensors_in(value):
        grad = tensor.grad if tensor.is_leaf else None
        found[id(tensor)] = (tensor, tensor._version, grad, None if grad is None else grad._version,
                             tensor.requires_grad,  # freezing a weight changes no version
                             _fingerprint(tensor))
    return found


def _trusted(kind) -> bool:
    """A class of the course's helpers or of torch (never one the student defined)."""
    return kind.__module__.split(".")[0] in ("utils", "torch")


def decode(tree):
    """The value ``encode`` recorded; ``ValueError`` for any tree ``encode`` cannot make."""
    if type(tree) is not tuple or not tree or type(tree[0]) is not str:
        raise ValueError("not a recorded value")
    tag, *rest = tree
    if tag == "tensor" and len(rest) == 3 and type(rest[0]) is torch.Tensor and type(rest[1]) is bool \
            and (rest[2] is None or type(rest[2]) is torch.Tensor):
        tensor = rest[0].clone().requires_grad_(rest[1]) if rest[1] and rest[0].is_floating_point() else rest[0]
        if rest[2] is not None and tensor.requires_grad and rest[2].shape == tensor.shape:
            tensor.grad = rest[2]
        return tensor
    if tag == "handle" and HANDLES is not None and hasattr(HANDLES, "decode"):
        return HANDLES.decode(tree)
    if tag == "torchmodule" and HANDLES is not None and hasattr(HANDLES, "submodule"):
        return HANDLES.submodule(tree, {}, "")  # a module of torch's or the course's the student made
    if tag == "argument" and HANDLES is not None:
        return HANDLES.argument(tree)
    if tag == "generator" and len(rest) == 1 and type(rest[0]) is torch.Tensor:
        generator = torch.Generator()
        generator.set_state(rest[0])
        return generator
    if tag == "value" and len(rest) == 1 and (rest[0] is None or type(rest[0]) in (bool, int, float, complex, str, bytes)):
        return rest[0]
    if tag == "path" and len(rest) == 2 and type(rest[0]) is str:
        return pathlib.Path(rest[0])  # a path the student's function made: only its name crosses
    if tag in ("list", "tuple") and len(rest) == 1 and type(rest[0]) is list:
        items = [decode(item) for item in rest[0]]
        return items if tag == "list" else tuple(items)
    if tag in ("set", "frozenset") and len(rest) == 1 and type(rest[0]) is list:
        items = [decode(item) for item in rest[0]]
        if any(type(item) not in (bool, int, float, str, bytes) for item in items):
            raise ValueError("not a recorded value (set)")
        return set(items) if tag == "set" else frozenset(items)
    if tag == "was" and HANDLES is not None and hasattr(HANDLES, "place"):
        return HANDLES.place(tree)  # the judge's own layer, where the student's was when the call started
    if (tag in ("dict", "odict") and len(rest) == 1 and type(rest[0]) is list) or \
            (tag == "defaultdict" and len(rest) == 2 and rest[0] in _FACTORIES and type(rest[1]) is list):
        out = {} if tag == "dict" else collections.OrderedDict() if tag == "odict" \
            else collections.defaultdict(_FACTORIES[rest[0]])
        for pair in rest[-1]:
            if type(pair) is not tuple or len(pair) != 2:
                raise ValueError("not a recorded dict")
            out[decode(pair[0])] = decode(pair[1])
        return out
    if tag == "named" and len(rest) == 3 and type(rest[0]) is str and type(rest[1]) is list \
            and all(type(f) is str for f in rest[1]) and type(rest[2]) is list and len(rest[1]) == len(rest[2]):
        cls = collections.namedtuple(rest[0] if rest[0].isidentifier() else "Result", rest[1], rename=True)
        return cls(*(decode(item) for item in rest[2]))
    if tag == "dtype" and len(rest) == 1 and type(rest[0]) is str:
        dtype = getattr(torch, rest[0], None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if tag == "size" and len(rest) == 1 and type(rest[0]) is list and all(type(n) is int for n in rest[0]):
        return torch.Size(rest[0])
    if tag == "device" and len(rest) == 1 and type(rest[0]) is str:
        return torch.device(rest[0])
    if tag == "slice" and len(rest) == 1 and type(rest[0]) is list and len(rest[0]) == 3:
        return slice(*(decode(item) for item in rest[0]))
    if tag == "dataclass" and len(rest) == 3 and type(rest[0]) is str and rest[0].split(".")[0] == "utils" \
            and type(rest[1]) is str and type(rest[2]) is list:
        import importlib
        cls = importlib.import_module(rest[0])
        for part in rest[1].split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            fields = {f.name for f in dataclasses.fields(cls)}
            values = {}
            for pair in rest[2]:
                if type(pair) is not tuple or len(pair) != 2 or pair[0] not in fields:
                    raise ValueError("not a recorded dataclass")
                values[pair[0]] = decode(pair[1])
            return cls(**values)
    if tag in ("ndarray", "npscalar"):
        import numpy as np
        if tag == "ndarray" and len(rest) == 3 and type(rest[0]) is str and type(rest[1]) is list \
                and all(type(n) is int for n in rest[1]) and type(rest[2]) is bytes:
            dtype = np.dtype(rest[0])
            if dtype.kind in "biufc":
                return np.frombuffer(rest[2], dtype=dtype).reshape(rest[1]).copy()
        if tag == "npscalar" and len(rest) == 2 and type(rest[0]) is str and type(rest[1]) is bytes:
            dtype = np.dtype(rest[0])
            if dtype.kind in "biufc" and len(rest[1]) == dtype.itemsize:
                return np.frombuffer(rest[1], dtype=dtype)[0]
    raise ValueError(f"not a recorded value ({tag})")


def same(a, b) -> bool:
    """Whether two encoded trees hold the same values (tensors and floats to float32 rounding:
    the judge may compute a test's inputs with another number of threads)."""
    if type(a) is not type(b):
        return False
    if type(a) is tuple and a[:1] == ("summary",) and len(a) == len(b) == 4 and b[0] == "summary":
        if type(a[1]) is not torch.Tensor or type(b[1]) is not torch.Tensor or a[1].shape != b[1].shape:
            return False
        scale = float(a[1][2].abs()) + 1.0  # the sum of absolute values bounds every rounding difference
        return a[2:] == b[2:] and bool(torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-6 * scale, equal_nan=True))
    if type(a) is torch.Tensor:
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True))
        return bool(torch.equal(a, b))
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def difference(a, b, path: str = "") -> str:
    """Where two encoded trees first differ (for a maintainer reading ``python -m autograde.judge``)."""
    if same(a, b):
        return ""
    if type(a) in (tuple, list) and type(b) is type(a) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            found = difference(x, y, f"{path}/{index}")
            if found:
                return found
    return f"at {path or '/'}: {_brief(a)} != {_brief(b)}"


def _brief(value) -> str:
    if type(value) is torch.Tensor:
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if type(value) in (tuple, list):
        head = f"{value[0]!r}, " if value and type(value[0]) is str else ""
        return f"{type(value).__name__}({head}{len(value)} items)"
    if value is None or type(value) in (bool, int, float, str):
        return repr(value)[:80]
    return type(value).__name__


def map_tensors(function, value):
    """``value`` with each tensor ``t`` in it (lists, tuples, named tuples, dicts) replaced by ``function(t)``."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if type(value) is list:
        return [map_tensors(function, x) for x in value]
    if isinstance(value, tuple):
        items = [map_tensors(function, x) for x in value]
        return type(value)(*items) if hasattr(type(value), "_fields") else tuple(items)
    if type(value) is dict:
        return {k: map_tensors(function, v) for k, v in value.items()}
    return value


def unseen():
    """Tensor operations that a test's dispatch modes do not see: the grader's own copies (the
    recorder's, the judge's reading of arguments) must not count as reads, allocations or forbidden
    operators of the student's call they surround."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Python) | \
        torch._C.DispatchKeySet(torch._C.DispatchKey.PythonTLSSnapshot)
    return torch._C._ExcludeDispatchKeyGuard(keys)


def to_bytes(tree) -> str:
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def from_bytes(text: str):
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


# ---------------------------------------------------------------------------
# The state a test depends on besides its own code: random numbers and torch's global modes
# ---------------------------------------------------------------------------

def global_state() -> dict:
    """The random-number generators' states and the global modes a test's values depend on."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled()}
    np = _numpy()
    if np is not None:
        state["numpy"] = tuple(np.random.get_state())
    return state


def state_changes(before: dict, after: dict) -> dict:
    """The parts of ``after`` that differ from ``before`` (a call usually moves torch's generator only)."""
    changed = {}
    for key, value in after.items():
        old = before.get(key)
        if key == "torch":
            differs = not torch.equal(old, value)
        elif key == "numpy":
            (_, keys, pos, *rest), (_, keys2, pos2, *rest2) = old, value
            differs = pos != pos2 or rest != rest2 or not (keys == keys2).all()
        else:
            differs = old != value
        if differs:
            changed[key] = value
    return changed


def set_global_state(tree) -> None:
    """Put back a state (or the parts of one) recorded with ``encode(global_state())``."""
    state = decode(tree)
    if type(state) is not dict:
        raise ValueError("not a recorded state")
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "random" in state:
        version, internal, gauss = state["random"]
        random.setstate((version, tuple(internal), gauss))
    if "dtype" in state:
        torch.set_default_dtype(state["dtype"])
    if "grad" in state:
        torch.set_grad_enabled(bool(state["grad"]))
    if "numpy" in state:
        import numpy as np
        np.random.set_state(tuple(state["numpy"]))
