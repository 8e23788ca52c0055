"""Friendly checks for the visible tests.

Each check raises an ``AssertionError`` whose message says what is wrong in
plain words, and where possible which common mistake produces exactly what
you returned ("your output equals attention without the 1/sqrt(d) scale").
When a check passes it prints nothing: call ``passed("...")`` at the end of a
test to celebrate.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import sys
import threading
import types
from typing import Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .trace import Watching


def passed(message: str) -> None:
    """Print a green tick and ``message``: the last line of a visible test that passed."""
    print(f"\N{WHITE HEAVY CHECK MARK} {message}")


# ---------------------------------------------------------------------------
# Plain values: what the student returns is compared as data, never trusted as an object
# ---------------------------------------------------------------------------

def plain(value, name: str = "output"):
    """``value`` converted to exact built-in types, so that comparing it cannot run student code.

    A tensor of any subclass becomes an exact ``torch.Tensor`` viewing the same data (still attached
    to the autograd graph); ``bool``/``int``/``float``/``complex``/``str``/``bytes`` subclasses become
    the built-in type with the same value; lists, tuples and dicts are converted item by item (a
    named tuple keeps its field names). Anything else is returned unchanged (modules, None).
    A tensor that computes through Python (a ``__torch_dispatch__`` subclass) cannot be made plain
    and raises ``AssertionError``.
    """
    kind = type(value)
    if isinstance(value, torch.Tensor):
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            tensor = value
        else:
            with torch._C.DisableTorchFunctionSubclass():
                tensor = torch.Tensor.as_subclass(value, torch.Tensor)
        if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
            raise AssertionError(f"{name} is a {kind.__name__}, not a plain torch.Tensor")
        if torch._C._dispatch_keys(tensor).has(torch._C.DispatchKey.Python):
            raise AssertionError(f"{name} is a tensor subclass that computes in Python ({kind.__name__}): "
                                 "return an ordinary torch.Tensor")
        return tensor
    for base in (bool, int, float, complex, str, bytes):
        if isinstance(value, base):
            if kind is base:
                return value
            if base is bool:
                return int.__int__(value) != 0
            return {int: int.__int__, float: float.__float__, complex: complex.__complex__,
                    str: str.__str__, bytes: bytes.__bytes__}[base](value)
    if isinstance(value, dict):
        return {plain(k, name): plain(v, f"{name}[{k!r}]") for k, v in dict.items(value)}
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{name}[{i}]") for i, v in enumerate(list.__iter__(value) if isinstance(value, list)
                                                                   else tuple.__iter__(value))]
        if isinstance(value, list):
            return items
        fields = getattr(kind, "_fields", None)
        if isinstance(fields, tuple) and len(fields) == len(items) and all(isinstance(f, str) for f in fields):
            # A named tuple keeps its field names, in a fresh class that runs none of the original's code.
            return collections.namedtuple(str.__str__(kind.__name__), [str.__str__(f) for f in fields],
                                          rename=True)(*items)
        return tuple(items)
    return value


def plain_results(function):
    """``function`` with its results passed through ``plain``: the graders hand the student's
    functions to the hidden tests this way (tests/notebook_harness.py, autograde/verify_harness.py)."""
    def student_function(*args, **kwargs):
        return plain(function(*args, **kwargs), f"the value returned by {function.__name__}")
    student_function.__name__ = function.__name__
    student_function.__qualname__ = function.__qualname__
    student_function.__doc__ = function.__doc__
    return student_function


def check_type(value, expected_type, name: str = "output") -> None:
    """Fail if ``value`` is not an instance of ``expected_type`` (e.g. ``torch.Tensor``)."""
    if value is None:
        raise AssertionError(f"{name} is None: did you forget a `return` statement?")
    if not isinstance(value, expected_type):
        raise AssertionError(f"{name} should be a {expected_type.__name__}, "
                             f"but it is a {type(value).__name__}.")


def check_shape(tensor, expected: Sequence[int], name: str = "output") -> None:
    """Fail with a readable message if ``tensor.shape`` is not ``expected``.

    A shape with the right sizes in the wrong order is called out as a transpose.
    """
    check_type(tensor, torch.Tensor, name)
    tensor = plain(tensor, name)
    actual, expected = tuple(tensor.shape), tuple(plain(list(expected)))
    if actual == expected:
        return
    message = f"{name} has shape {actual}, expected {expected}."
    if sorted(actual) == sorted(expected):
        message += " The sizes are right but in the wrong order: check for a missing or extra transpose."
    elif len(actual) != len(expected):
        message += (f" It has {len(actual)} dimensions instead of {len(expected)}:"
                    " check for a missing or extra sum, squeeze or unsqueeze.")
    raise AssertionError(message)


def check_finite(tensor, name: str = "output", hint: str = "") -> None:
    """Fail if ``tensor`` holds NaN or infinite values; ``hint`` suggests the likely cause."""
    check_type(tensor, torch.Tensor, name)
    tensor = plain(tensor, name).detach()
    bad = ~torch.isfinite(tensor)
    if bad.any():
        kinds = []
        if torch.isnan(tensor).any():
            kinds.append("NaN")
        if torch.isinf(tensor).any():
            kinds.append("infinite")
        raise AssertionError(f"{name} has {int(bad.sum())} {' and '.join(kinds)} value(s) out of "
                             f"{tensor.numel()}. {hint}".rstrip())


def check_close(actual, expected, name: str = "output", *, atol: float = 1e-5, rtol: float = 1e-4,
                mistakes: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fail unless ``actual`` matches ``expected`` within the tolerances.

    ``mistakes`` maps a description of a common mistake to what that mistake
    would produce; if ``actual`` equals one of them, the message names it.
    """
    actual, expected = plain(actual, name), plain(expected, "the reference")
    check_shape(actual, expected.shape, name)
    actual = actual.detach().to("cpu", expected.dtype)
    expected = expected.detach().to("cpu")
    if torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
        return
    for description, wrong in (mistakes or {}).items():
        if wrong.shape == actual.shape and torch.allclose(actual, wrong.detach().to("cpu", actual.dtype),
                                                          atol=atol, rtol=rtol, equal_nan=True):
            raise AssertionError(f"{name} is wrong in a recognisable way: it equals what you get "
                                 f"with {description}.")
    if torch.isfinite(expected).all():
        check_finite(actual, name, "The expected values are all finite.")
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    share = float((diff > atol + rtol * expected.abs()).float().mean())
    raise AssertionError(f"{name} does not match the reference: {share:.0%} of the entries differ; "
                         f"the largest difference is {float(diff.max()):.3g} at index {worst} "
                         f"(you returned {float(actual[worst]):.4g}, expected {float(expected[worst]):.4g}).")


def check_distribution(probs, dim: int = -1, name: str = "weights", atol: float = 1e-5) -> None:
    """Fail unless ``probs`` is non-negative and sums to 1 along ``dim``.

    If it sums to 1 along another dimension instead, the message says the
    softmax (or normalisation) was taken over the wrong axis.
    """
    check_type(probs, torch.Tensor, name)
    probs = plain(probs, name).detach()
    check_finite(probs, name, "A softmax of finite scores is always finite: is the maximum subtracted "
                              "before exponentiating?")
    if (probs < -atol).any():
        raise AssertionError(f"{name} has negative entries; probabilities are never negative.")
    sums = probs.sum(dim)
    if torch.allclose(sums, torch.ones_like(sums), atol=atol):
        return
    for other in range(probs.dim()):
        if other != dim % probs.dim():
            other_sums = probs.sum(other)
            if torch.allclose(other_sums, torch.ones_like(other_sums), atol=atol):
                raise AssertionError(f"{name} sums to 1 along dimension {other}, not along dimension "
                                     f"{dim}: the softmax is taken over the wrong axis.")
    raise AssertionError(f"{name} should sum to 1 along dimension {dim}, but the sums range from "
                         f"{float(sums.min()):.4g} to {float(sums.max()):.4g}.")


def check_gradients_flow(parameters, name: str = "the module") -> None:
    """Fail if any parameter got no gradient (or a non-finite one) after ``loss.backward()``."""
    for pname, p in parameters:
        if p.requires_grad and p.grad is None:
            raise AssertionError(f"{pname} in {name} received no gradient: is it used in forward, "
                                 "and is it registered as an nn.Parameter (or inside a sub-module)?")
        if p.grad is not None:
            check_finite(p.grad, f"the gradient of {pname}")


# ---------------------------------------------------------------------------
# Tools for tests that check how a result was computed, not only what it is
# ---------------------------------------------------------------------------

class _ForbiddenOps(Watching):
    """Raise as soon as an operator whose name contains one of ``fragments`` runs.

    It works below Python, where every route to a computation meets: ``torch.softmax``,
    ``F.softmax``, ``x.softmax`` and ``nn.Softmax`` all end in the same ``softmax`` operator.
    """

    def __init__(self, fragments: Sequence[str], message: str):
        super().__init__()
        self.fragments = tuple(fragments)
        self.message = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(fragment in name for fragment in self.fragments):
            raise AssertionError(f"{self.message} (PyTorch operator `{name}` was called)")
        return func(*args, **(kwargs or {}))


def forbid_ops(fragments: Sequence[str], message: str):
    """Inside this block, any PyTorch operator whose name contains one of ``fragments`` raises
    ``AssertionError(message)``: the tests of an exercise that asks you to write something
    yourself use it so that calling the built-in cannot pass. (``shortcuts_off(ops=...)`` with
    no other target: the ways of leaving the dispatch mode are switched off too.)"""
    return shortcuts_off(ops=fragments, message=message)


class LargestTensor(Watching):
    """Record the largest block of memory that any PyTorch operator returns inside the block.

    >>> with LargestTensor() as record:
    ...     out = my_attention(q, k, v)
    >>> record.largest_bytes

    Views (transpose, slicing, expand) share the memory of the tensor they view,
    so they count with that tensor's size, never more.
    """

    def __init__(self):
        super().__init__()
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()

    def __enter__(self):
        super().__enter__()
        # The recorder cannot be left from inside (the ways out of a dispatch mode are switched off).
        self._guard = shortcuts_off(message="the memory recorder must stay on while this test runs")
        self._guard.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._guard.__exit__(*exc)
        finally:
            super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                size = tensor.untyped_storage().nbytes()
                if size > self.largest_bytes:
                    self.largest_bytes, self.largest_shape = size, tuple(tensor.shape)
        return out


# ---------------------------------------------------------------------------
# Shortcuts switched off: the library function that does the exercise's work earns nothing
# ---------------------------------------------------------------------------

# What would switch the checks themselves off: PyTorch's ways of leaving a dispatch mode, and the
# interpreter's profile/trace hooks that `shortcuts_off` watches calls with.
_ESCAPE_HATCHES = (
    "torch.utils._python_dispatch._disable_current_modes",
    "torch.utils._python_dispatch._pop_mode",
    "torch.utils._python_dispatch._pop_mode_temporarily",
    "torch.utils._python_dispatch._get_current_dispatch_mode",
    "torch.utils._python_dispatch._get_current_dispatch_mode_stack",
    "torch._C._pop_torch_dispatch_stack",
    "torch._C._get_dispatch_stack_at",
    "torch._C._unset_dispatch_mode",
    "torch._C._set_dispatch_mode",
    "sys.setprofile",
    "sys.settrace",
    "sys.getprofile",
    "threading.setprofile",
    "threading.settrace",
)
# Reading the mode stack changes nothing by itself; PyTorch's own code reads it (``torch.save`` asks
# whether a fake-tensor mode is active), so these two are refused only when the caller is not torch.
_READ_ONLY_HATCHES = ("torch.utils._python_dispatch._get_current_dispatch_mode",
                      "torch.utils._python_dispatch._get_current_dispatch_mode_stack")
_AUDITED = ("sys.setprofile", "sys.settrace")
_THREAD_START = threading.Thread._bootstrap_inner.__code__
# Popping a dispatch mode is allowed only as a mode's own __exit__ does it: (_pop_mode, __exit__).
_POP_MODE = (inspect.unwrap(torch.utils._python_dispatch._pop_mode).__code__, TorchDispatchMode.__exit__.__code__)
_guards: list = []  # the active `shortcuts_off` blocks, innermost last


def _resolve(dotted: str):
    """The object a dotted name points to (``"torch.nn.utils.clip_grad_norm_"``), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _codes_and_callables(target, codes: dict, callables: dict, label: str) -> None:
    """Collect the code objects (Python functions) and the objects (built-ins) that identify ``target``."""
    if isinstance(target, (staticmethod, classmethod)):
        target = target.__func__
    if isinstance(target, property):
        for part in (target.fget, target.fset):
            if part is not None:
                _codes_and_callables(part, codes, callables, label)
        return
    if isinstance(target, type):
        for name, member in vars(target).items():
            if callable(member) or isinstance(member, (staticmethod, classmethod, property)):
                _codes_and_callables(member, codes, callables, f"{label}.{name}")
        callables[id(target)] = (target, label)
        return
    func = getattr(target, "__func__", target)  # bound methods
    # A decorated function (functools.wraps, @contextmanager, @torch.no_grad): only the original's
    # code identifies it; the wrapper's code is shared by everything the decorator wraps.
    try:
        func = inspect.unwrap(func)
    except ValueError:
        pass
    code = getattr(func, "__code__", None)
    if isinstance(code, types.CodeType):
        codes[code] = label
    else:
        callables[id(target)] = (target, label)


def _c_origin(func) -> str:
    """The module a built-in function or method belongs to."""
    owner = getattr(func, "__self__", None)
    module = getattr(func, "__module__", None)
    if not module and owner is not None:
        module = getattr(owner if isinstance(owner, (type, types.ModuleType)) else type(owner), "__module__", None)
        if isinstance(owner, types.ModuleType):
            module = owner.__name__
    return module or ""


class _Guard:
    """One `shortcuts_off` block: what it forbids and what it caught."""

    def __init__(self, targets, message: str):
        self.message = message
        self.codes: dict = {}
        self.callables: dict = {}
        self.packages: list[str] = []
        self.caught: list[str] = []
        for target in tuple(targets) + _ESCAPE_HATCHES:
            if isinstance(target, str) and target.endswith(".*"):
                self.packages.append(target[:-2])
                continue
            label = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
            obj = _resolve(target) if isinstance(target, str) else target
            if obj is not None:
                _codes_and_callables(obj, self.codes, self.callables, label)

    def in_package(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.packages)

    def violation(self, label: str) -> AssertionError:
        self.caught.append(label)
        return AssertionError(f"{self.message} (`{label}` is switched off here)")

    def profile(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            label = self.codes.get(code)
            if label is not None and code is _POP_MODE[0] and frame.f_back is not None \
                    and frame.f_back.f_code is _POP_MODE[1]:
                return  # a dispatch mode (a nested check) leaving the ordinary way, by its __exit__
            # A module body running is an import, not a use of the package.
            if label is None and self.packages and code.co_name != "<module>" \
                    and self.in_package(frame.f_globals.get("__name__", "")):
                label = f"{frame.f_globals.get('__name__')}.{code.co_name}"
            if label in _READ_ONLY_HATCHES and frame.f_back is not None \
                    and frame.f_back.f_globals.get("__name__", "").startswith("torch."):
                return  # PyTorch asking which modes are active, e.g. torch.save looking for a fake mode
            if label is not None and not self._from_checks(frame.f_back):
                raise self.violation(label)
        elif event == "c_call":
            hit = self.callables.get(id(arg))
            label = hit[1] if hit is not None and hit[0] is arg else None
            if label is not None and frame.f_code is _POP_MODE[0] and frame.f_back is not None \
                    and frame.f_back.f_code is _POP_MODE[1]:
                return
            if label is None and self.packages and self.in_package(_c_origin(arg)):
                label = f"{_c_origin(arg)}.{getattr(arg, '__name__', '?')}"
            if label is not None and not self._from_checks(frame):
                raise self.violation(label)

    @staticmethod
    def _from_checks(frame) -> bool:
        return frame is not None and frame.f_globals.get("__name__") == __name__


_audit_installed = []


def _install_audit_hook() -> None:
    """Once per process: while a `shortcuts_off` block is active, nothing else may replace the profile
    hook that watches calls (an audit hook cannot be removed, so this protection cannot be undone)."""
    if _audit_installed:
        return
    guards = _guards

    def audit(event, args):
        # CPython removes a profile hook that raised (a shortcut was caught): that block fails anyway.
        if guards and event in _AUDITED and not guards[-1].restoring and not guards[-1].caught:
            # A new thread installing the watcher that `threading.setprofile` handed it (tqdm's monitor).
            if event == "sys.setprofile" and sys._getframe(1).f_code is _THREAD_START:
                return
            raise guards[-1].violation(event)

    sys.addaudithook(audit)
    _audit_installed.append(audit)


def _dispatch_stack() -> list[int]:
    """The identities of the dispatch modes in force, outermost first."""
    return [id(torch._C._get_dispatch_stack_at(i)) for i in range(torch._C._len_torch_dispatch_stack())]


@contextlib.contextmanager
def shortcuts_off(*targets, ops: Sequence[str] = (), message: str = "this exercise asks you to write this yourself"):
    """Inside this block, calling any of ``targets`` raises ``AssertionError(message ...)``.

    ``targets`` are functions, methods, classes (every method of the class) and built-ins, dotted
    names (``"torch.nn.utils.clip_grad_norm_"``) or whole packages (``"tokenizers.*"``). Calls are
    watched, not names, so an alias, a saved reference or a method reached another way is caught too.
    ``ops`` also forbids the PyTorch operators whose names contain these fragments (see
    ``forbid_ops``): every route to a computation meets there. The ways of switching these checks
    off (leaving dispatch modes, replacing the profile hook) are always forbidden, and a shortcut
    whose error was caught and swallowed still fails the block when it ends.

    Tests compute their references first, then call the student's code inside the block.
    """
    guard = _Guard(targets, message)
    guard.restoring = True
    _install_audit_hook()
    previous = sys.getprofile()
    previous_threading = threading._profile_hook
    mode = _ForbiddenOps(ops, message) if ops else contextlib.nullcontext()
    with mode:
        stack = _dispatch_stack()
        _guards.append(guard)
        hook = guard.profile  # one bound method, so that it can be recognised later
        sys.setprofile(hook)
        threading.setprofile(hook)
        guard.restoring = False
        try:
            yield guard
        finally:
            guard.restoring = True
            switched_off = sys.getprofile() is not hook
            sys.setprofile(previous)
            threading.setprofile(previous_threading)
            _guards.remove(guard)
            if _dispatch_stack() != stack:
                guard.caught.append("a change to PyTorch's dispatch modes")
            if switched_off:
                guard.caught.append("the removal of the call watcher")
    if guard.caught:
        raise AssertionError(f"{message} (`{guard.caught[0]}` is switched off here)")
