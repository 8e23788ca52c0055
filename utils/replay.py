"""Both sides of a test's calls into student functions: ``Recorder`` in the verifier, ``Replay`` in the judge.

In the verifier (``autograde/verify_harness.py``) each call a test makes into a student function is
recorded (``utils/transcript.py`` holds the format): its arguments, what it changed in place
(tensors, a module's weights, an optimizer's state, a generator), its result or the kind of error it
raised, the random state it left, the calls it made back into functions the test passed, and, when
the test backpropagates through a result, the gradient arriving there and what it gave each input.
In the judge (``autograde/judge_harness.py``), a process that never runs student code, each student
function is a ``Replay`` stub answering from that record: the test's references and comparisons are
the judge's own, so nothing the student's process did to itself (a forged verdict, memory rewritten
through a raw pointer) passes a wrong value off as right. Calls that differ from the record raise
``Mismatch``; a value that cannot cross raises ``Undecidable`` (a person should look).
"""

from __future__ import annotations

import contextlib
import pathlib
import types

import torch

from utils import handles as _handles, trace as _trace, traffic as _traffic, transcript
from utils.transcript import (Callback, Iterated, Opaque, decode, encode, global_state, map_tensors, module_tensors,
                              same, set_global_state, state_changes, tensors_in, unseen, versions_of)

# Errors a replayed call may raise again in the judge (a test may expect the student's function to
# raise one); any other recorded error becomes a RuntimeError.
ERRORS = {cls.__name__: cls for cls in (
    TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, NotImplementedError,
    ZeroDivisionError, AssertionError, OverflowError, StopIteration, ArithmeticError, LookupError,
    MemoryError)}


# The Recorder (in the verifier) or the Replay (in the judge) of the test cell being graded: the
# ranks ``utils.distributed.launch`` starts record, or replay, their own calls through it.
ACTIVE = None


class Mismatch(BaseException):
    """The test's calls in the judge differ from the recorded ones. A BaseException, so that a test's
    own ``except Exception`` cannot swallow it."""


class Undecidable(Mismatch):
    """The student's function returned (or left in an argument) a value that cannot cross as data:
    the judge cannot decide the test, and a person should look."""


# ---------------------------------------------------------------------------
# Gradients through a recorded call: a test may backpropagate through what the student returned
# ---------------------------------------------------------------------------

def grad_leaves(value) -> list:
    """The tensors requiring a gradient in a call's arguments (a module's parameters included), in
    an order both sides compute alike."""
    return [tensor for tensor in tensors_in(value) if tensor.requires_grad]


class _Tap(torch.autograd.Function):
    """Identity on a result the student returned; when a test backpropagates through it, records the
    gradient arriving there and what it contributes to each input (``torch.autograd.grad`` on the
    student's own graph, kept for the test's pass)."""

    @staticmethod
    def forward(ctx, output, inputs, passes):
        ctx.output, ctx.inputs, ctx.passes = output, inputs, passes
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        with unseen():
            contributions = [None] * len(ctx.inputs)
            if ctx.inputs:
                contributions = torch.autograd.grad(ctx.output, ctx.inputs, grad, retain_graph=True,
                                                    allow_unused=True)
            ctx.passes.append({"grad": grad.detach().clone(),
                               "inputs": [None if c is None else c.detach().clone() for c in contributions]})
        return grad, None, None


class _Replayed(torch.autograd.Function):
    """In the judge: the recorded results, whose backward checks the gradients arriving against the
    record and hands each input what the student's graph gave it."""

    @staticmethod
    def forward(ctx, values, passes, *inputs):
        ctx.passes, ctx.used, ctx.count = passes, [0] * len(values), len(inputs)
        ctx.set_materialize_grads(False)
        return tuple(v.detach().clone() for v in values)

    @staticmethod
    def backward(ctx, *grads):
        total = [None] * ctx.count
        for index, grad in enumerate(grads):
            if grad is None:
                continue
            recorded = ctx.passes[index]
            if ctx.used[index] >= len(recorded):
                raise Mismatch("a backward pass the recorded run did not make")
            step = recorded[ctx.used[index]]
            ctx.used[index] += 1
            if not same(grad.detach(), step["grad"]) or len(step["inputs"]) != ctx.count:
                raise Mismatch("another gradient than in the recorded run")
            for j, contribution in enumerate(step["inputs"]):
                if contribution is not None:
                    total[j] = contribution if total[j] is None else total[j] + contribution
        return (None, None, *total)


def _checked_passes(value, outputs: int) -> list:
    """The recorded backward passes of a call (untrusted data): one list per tapped output."""
    if type(value) is not list or len(value) != outputs:
        raise Mismatch("the recorded gradients do not match the results")
    for passes in value:
        if type(passes) is not list or any(
                type(p) is not dict or type(p.get("grad")) is not torch.Tensor or type(p.get("inputs")) is not list
                or any(c is not None and type(c) is not torch.Tensor for c in p["inputs"]) for p in passes):
            raise Mismatch("the recorded gradients are malformed")
    return value


class Recorder:
    """In the verifier: wraps the student's functions so that each call a test makes (not the
    student's own calls between them) is recorded, with its results passed through ``plain``."""

    def __init__(self, plain, is_student_class=None):
        self.plain, self.calls, self.depth = plain, [], 0
        # The student's objects the test meets, by handle (``utils/handles.py``).
        self.handles = _handles.Recorded(self, is_student_class) if is_student_class else None

    def wrap(self, function, name: str):
        recorder = self

        def recorded(*args, **kwargs):
            if recorder.depth:
                return function(*args, **kwargs)
            args, kwargs = _read_iterators(args, kwargs)
            entry = {"name": name}
            recorder.calls.append(entry)
            callbacks = entry["callbacks"] = []

            def watched(slot, callback):
                """A function of the test the student's code may call back: each call is recorded."""
                def called(*a, **k):
                    step = {"slot": slot}
                    callbacks.append(step)
                    # A layer of an argument handed over (an adapter's base) crosses as its place.
                    with unseen(), _handles.given(recorder.handles, args, kwargs, places):
                        try:
                            step["args"] = encode((list(a), k))
                        except Opaque as error:
                            entry.setdefault("opaque", f"a callback argument of type {error}")
                    try:
                        value = callback(*a, **k)
                    except BaseException as error:
                        step["raised"] = type(error).__name__
                        raise
                    with unseen(), _handles.given(recorder.handles, args, kwargs, places):
                        try:
                            step["result"] = encode(value)
                        except Opaque as error:
                            entry.setdefault("opaque", f"a callback result of type {error}")
                    return value
                return called

            places = _handles.module_places(args, kwargs)  # where the layers were: one may be moved
            with unseen():
                versions = versions_of((args, kwargs))
                try:
                    entry["args"] = encode(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)), brief=True)
                except Opaque as error:
                    entry["opaque"] = f"an argument of type {error}"
                before = global_state()
            given_args, given_kwargs = _iterators_again(*_with_callbacks(args, kwargs, watched))
            # Layers of its module arguments that carry a hook (a test counting which layers ran):
            # their calls inside this one are recorded, for the judge to fire its own layers' hooks.
            hooked = _hooked_layers(args, kwargs)
            if hooked:
                entry["layers"] = []

                def layer_called(module, inputs, output):
                    found = hooked.get(id(module))
                    if found is not None and found[0] is module and "layers" in entry:
                        with unseen():
                            try:
                                entry["layers"].append((found[1], encode(list(inputs)), encode(output)))
                            except Opaque as error:
                                entry.setdefault("opaque", f"a hooked layer's {error}")
                                entry["undecidable"] = True
                                del entry["layers"]
                watcher = torch.nn.modules.module.register_module_forward_hook(layer_called)
            recorder.depth += 1
            # Inside a rank, what the call sends and receives is recorded too (``utils/traffic.py``).
            traffic = _traffic.Recording() if _traffic.in_rank() else None
            # Under a test's watching dispatch mode, the operators it runs too (``utils/trace.py``).
            trace = _trace.Trace(args, kwargs) if _trace.watched() else None
            try:
                with traffic or contextlib.nullcontext(), trace or contextlib.nullcontext():
                    value = function(*given_args, **given_kwargs)
                if trace is not None and trace.problem is None:
                    with unseen():
                        traced = trace.record(value)
                    if traced is not None:
                        entry["trace"] = traced
                result = recorder.plain(value, f"the value returned by {name}")
            except BaseException as error:
                entry["raised"] = type(error).__name__
                with unseen(), _handles.given(recorder.handles, args, kwargs, places):
                    try:  # what it changed before raising (a cache that took a block, then found none)
                        entry["after"] = encode(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)),
                                                versions=versions)
                    except Opaque:
                        pass
                raise
            finally:
                recorder.depth -= 1
                if hooked:
                    watcher.remove()
                if traffic is not None:
                    traffic.finish()
                    if traffic.problem:
                        entry.setdefault("opaque", f"communication that cannot cross: {traffic.problem}")
                        entry["undecidable"] = True
                    elif traffic.ops:
                        entry["traffic"] = traffic.ops
                if trace is not None and trace.problem:
                    entry.setdefault("opaque", f"operators that cannot cross: {trace.problem}")
                    entry["undecidable"] = True
                with unseen():
                    changes = state_changes(before, global_state())
                    if changes:  # the judge must draw the same random numbers next
                        entry["state"] = encode(changes)
            with unseen(), _handles.given(recorder.handles, args, kwargs, places):
                try:
                    entry["after"] = encode(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)),
                                            versions=versions)
                    entry["result"] = _argument_of(result, args, kwargs) or encode(result)
                except Opaque as error:
                    if "opaque" not in entry:
                        entry["opaque"], entry["undecidable"] = f"a value of type {error}", True
                # Results attached to the autograd graph are tapped: the judge must hand the test's
                # inputs the gradients the student's graph gave them.
                if torch.is_grad_enabled() and "opaque" not in entry:
                    inputs, tapped, positions = grad_leaves((args, kwargs)), [], []

                    def tap(tensor):
                        positions.append(tensor.grad_fn is not None)
                        if tensor.grad_fn is None:
                            return tensor
                        tapped.append([])
                        return _Tap.apply(tensor, inputs, tapped[-1])

                    result = map_tensors(tap, result)
                    if tapped:
                        entry["tapped"], entry["passes"] = positions, tapped
            return result

        for attribute in ("__name__", "__qualname__", "__doc__"):
            setattr(recorded, attribute, getattr(function, attribute, None))
        return recorded

    # Ranks (``utils.distributed.launch``, forked): each records its own calls, sent back with its result.
    def launching(self, world_size: int, start_method: str) -> None:
        self.launch = {"name": "<launch>", "world_size": world_size}
        if start_method != "fork":  # a spawned rank holds no recorder
            self.launch["opaque"], self.launch["undecidable"] = "ranks started without the recorder", True
        self.calls.append(self.launch)

    def enter_rank(self, rank: int) -> None:
        self.calls = []  # this rank's own, in its copy of the recorder

    def leave_rank(self):
        with unseen():
            return transcript.to_bytes(self.calls)

    def ranks_done(self, calls: list) -> None:
        if any(type(c) is not str for c in calls):
            self.launch.setdefault("opaque", "a rank that sent no record")
            self.launch["undecidable"] = True
        else:
            self.launch["ranks"] = calls


class Replay:
    """In the judge: stands for the student's functions, answering each call from the record."""

    def __init__(self, calls):
        self.calls, self.used = calls, [False] * len(calls)
        self.handles = _handles.StandIns(self)

    def _entry(self, name: str, args, kwargs) -> dict:
        """The first unused recorded call of ``name`` with these arguments. Usually the next one; a
        later one when the test's calls came in another order (it iterated over a set of strings,
        whose order differs between processes)."""
        try:
            shown = encode(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)), brief=True)
        except Opaque as error:
            raise Mismatch(f"{name} was called with an argument of type {error}") from None
        for index, entry in enumerate(self.calls):
            if self.used[index] or entry.get("name") != name:
                continue
            if "opaque" in entry:
                self.used[index] = True
                if entry.get("undecidable") is True:
                    raise Undecidable(f"{name} returned {entry['opaque']}")
                raise Mismatch(f"the call of {name} involved {entry['opaque']}")
            if same(shown, entry.get("args")):
                self.used[index] = True
                return entry
        closest = next((e.get("args") for i, e in enumerate(self.calls) if not self.used[i] and e.get("name") == name), None)
        raise Mismatch(f"{name} was called with arguments no recorded call of it had "
                       f"({transcript.difference(shown, closest) if closest is not None else 'none left'})")

    def stub(self, name: str):
        replay = self

        def replayed(*args, **kwargs):
            args, kwargs = _read_iterators(args, kwargs)
            with unseen():  # the judge's reading of the arguments, as the recorder's: not the student's work
                entry = replay._entry(name, args, kwargs)
            places = _handles.module_places(args, kwargs)
            replay.call_back(entry.get("callbacks"), args, kwargs, places)
            if "traffic" in entry:  # sent for real, seen by the test's communication log
                try:
                    _traffic.replay(entry["traffic"])
                except ValueError as error:
                    raise Mismatch(f"{name}: {error}") from None
            computed = None
            if "trace" in entry:  # run again, seen by the test's dispatch modes
                try:
                    computed = _trace.run(entry["trace"], args, kwargs)
                except ValueError as error:
                    raise Mismatch(f"{name}: {error}") from None
            if "state" in entry:
                set_global_state(entry["state"])
            if "raised" in entry:
                if "after" in entry:
                    with unseen(), _handles.given(replay.handles, args, kwargs, places):
                        _write_back(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)), entry["after"])
                raise ERRORS.get(entry["raised"], RuntimeError)()
            if "result" not in entry:
                raise Mismatch(f"the recorded call of {name} has no result")
            with unseen(), _handles.given(replay.handles, args, kwargs, places):
                _write_back(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)), entry["after"])
                result = _argument(entry["result"], args, kwargs)
                if computed is not None:
                    try:
                        _trace.check(computed, result)
                    except LookupError as error:
                        raise Undecidable(f"{name}: {error}") from None
                    except ValueError as error:
                        raise Mismatch(f"{name}: {error}") from None
            if "layers" in entry:
                _fire_hooks(entry["layers"], args, kwargs)
            if "tapped" in entry:
                result = replay.attach(result, entry, grad_leaves((args, kwargs)))
            return result

        replayed.__name__ = replayed.__qualname__ = name
        return replayed

    @staticmethod
    def call_back(steps, args, kwargs, places=None) -> None:
        """Make the calls the student's code made to the test's functions, with the recorded
        arguments, in order; each must answer what the student's code was told."""
        if type(steps) is not list:
            raise Mismatch("the recorded callbacks are malformed")
        for step in steps:
            if type(step) is not dict or type(step.get("slot")) is not tuple or len(step["slot"]) != 2:
                raise Mismatch("the recorded callbacks are malformed")
            try:
                callback = _handles.at(args, kwargs, step["slot"])
            except ValueError:
                raise Mismatch("a callback the test did not pass") from None
            if not _is_callback(callback):
                raise Mismatch("a callback the test did not pass")
            with _handles.given(transcript.HANDLES, args, kwargs, places):
                a, k = decode(step.get("args"))
            if type(a) is not list or type(k) is not dict or any(type(name) is not str for name in k):
                raise Mismatch("the recorded callbacks are malformed")
            try:
                value = callback(*a, **k)
            except Mismatch:
                raise
            except BaseException as error:
                if step.get("raised") != type(error).__name__:
                    raise Mismatch("a callback raised where the recorded run's did not") from None
                continue
            with unseen(), _handles.given(transcript.HANDLES, args, kwargs, places):
                answered = encode(value)
            if "raised" in step or not same(answered, step.get("result")):
                raise Mismatch("a callback answered otherwise than in the recorded run")

    @staticmethod
    def attach(result, entry, inputs):
        """The recorded results joined to the judge's graph (see ``_Replayed``)."""
        positions = entry["tapped"]
        flat = []
        map_tensors(flat.append, result)
        if type(positions) is not list or len(positions) != len(flat) or any(type(p) is not bool for p in positions):
            raise Mismatch("the recorded gradients do not match the results")
        values = [t for t, tapped in zip(flat, positions) if tapped]
        passes = _checked_passes(entry.get("passes"), len(values))
        attached = iter(_Replayed.apply(values, passes, *inputs))
        counter = iter(positions)
        return map_tensors(lambda t: next(attached) if next(counter) else t, result)

    def finished(self) -> bool:
        return all(self.used)

    # Ranks: each replays the calls its counterpart in the verifier made.
    def launching(self, world_size: int, start_method: str) -> None:
        for index, entry in enumerate(self.calls):
            if not self.used[index] and entry.get("name") == "<launch>":
                self.used[index] = True
                if "opaque" in entry:
                    raise (Undecidable if entry.get("undecidable") is True else Mismatch)("ranks not recorded")
                ranks = entry.get("ranks")
                if entry.get("world_size") != world_size or type(ranks) is not list or len(ranks) != world_size \
                        or any(type(r) is not str for r in ranks):
                    raise Mismatch("ranks other than the recorded ones")
                self.ranks = ranks
                return
        raise Mismatch("a launch of ranks the recorded run did not make")

    def enter_rank(self, rank: int) -> None:
        calls = transcript.from_bytes(self.ranks[rank])
        if type(calls) is not list:
            raise Mismatch("the recorded calls of a rank are malformed")
        self.calls = [call for call in calls if type(call) is dict]
        self.used = [False] * len(self.calls)

    def leave_rank(self):
        if not self.finished():
            raise Mismatch("calls left over in a rank")
        return None

    def ranks_done(self, calls: list) -> None:
        pass


def _hooked_layers(args, kwargs) -> dict:
    """``{id(layer): (layer, (argument path, dotted name))}`` for the layers of the modules among a
    call's arguments that carry a forward hook or pre-hook."""
    found = {}
    for value, path in _handles.argument_paths(args, kwargs).values():
        if isinstance(value, torch.nn.Module):
            for name, layer in value.named_modules():
                if (layer._forward_hooks or layer._forward_pre_hooks) and id(layer) not in found:
                    found[id(layer)] = (layer, (path, name))
    return found


def _fire_hooks(steps, args, kwargs) -> None:
    """In the judge: the hooks on its own layers, called with what each layer received and returned
    in the student's call (in order; the layers themselves do not run again)."""
    if type(steps) is not list:
        raise Mismatch("the recorded layer calls are malformed")
    for step in steps:
        if type(step) is not tuple or len(step) != 3 or type(step[0]) is not tuple or len(step[0]) != 2 \
                or type(step[0][1]) is not str:
            raise Mismatch("the recorded layer calls are malformed")
        try:
            layer = _handles.at(args, kwargs, step[0][0]).get_submodule(step[0][1])
        except (ValueError, AttributeError):
            raise Mismatch("a recorded layer call names no layer of the test's") from None
        inputs, output = decode(step[1]), decode(step[2])
        if type(inputs) is not list:
            raise Mismatch("the recorded layer calls are malformed")
        inputs = tuple(inputs)
        for key, hook in list(layer._forward_pre_hooks.items()):
            hook(layer, inputs, {}) if key in layer._forward_pre_hooks_with_kwargs else hook(layer, inputs)
        for key, hook in list(layer._forward_hooks.items()):
            hook(layer, inputs, {}, output) if key in layer._forward_hooks_with_kwargs else hook(layer, inputs, output)


def _is_callback(value) -> bool:
    import functools
    import types
    return isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial))


# Iterators a test may hand a student function: read into an ``Iterated`` list (recorded, compared
# and written back like a list), then handed over as a fresh iterator, read once as before.
_ITERATORS = (type(iter([])), type(iter(())), type(iter(range(0))), types.GeneratorType)


def _read_iterators(args, kwargs):
    return ([Iterated(a) if type(a) in _ITERATORS else a for a in args],
            {k: Iterated(v) if type(v) in _ITERATORS else v for k, v in kwargs.items()})


def _iterators_again(args, kwargs):
    return ([iter(a) if type(a) is Iterated else a for a in args],
            {k: iter(v) if type(v) is Iterated else v for k, v in kwargs.items()})


def _with_callbacks(args, kwargs, replace):
    """(args as a list, kwargs) with each function passed at the top level replaced by
    ``replace(slot, function)``, where ``slot`` is ``("arg", index)`` or ``("kw", name)``."""
    args = [replace(("arg", i), a) if _is_callback(a) else a for i, a in enumerate(args)]
    kwargs = {k: replace(("kw", k), v) if _is_callback(v) else v for k, v in kwargs.items()}
    return args, kwargs


def _argument_of(result, args, kwargs):
    """``("argument", slot)`` when the student's function returned one of its arguments itself (a
    model it changed in place): the judge returns its own object."""
    if isinstance(result, (bool, int, float, str, type(None))):
        return None
    for index, value in enumerate(args):
        if value is result:
            return ("argument", ["arg", index])
    for key, value in kwargs.items():
        if value is result:
            return ("argument", ["kw", key])
    return None


def _argument(tree, args, kwargs):
    """The recorded result: the judge's own argument where the student returned an argument."""
    if type(tree) is tuple and tree[:1] == ("argument",):
        try:
            if len(tree) == 2:
                return _handles.at(args, kwargs, tree[1])
        except ValueError:
            pass
        raise Mismatch("the recorded result names an argument the test did not pass")
    return decode(tree)


def _write_back(given, tree) -> None:
    """What the student's function did in place to the tensors (and modules' weights) it was
    given, done to the judge's: ``tree`` is the recorded encoding of ``given`` after the call."""
    tag = tree[0] if type(tree) is tuple and tree else None
    if tag == "unchanged":
        return
    if tag == "handle":
        if not _same_handle(given, tree):
            raise Mismatch("an object of the student's class was not recorded as itself")
        _write_back_parts(given, *tree[5:])
    elif tag == "torchmodule" and isinstance(given, torch.nn.Module):
        write_back_module(given, tree)
    elif isinstance(given, torch.nn.Module):
        modules = list(given.modules())
        if tag != "module" or len(tree) != 6 or type(tree[4]) is not list or len(tree[4]) != len(modules) \
                or any(type(flag) is not bool for flag in tree[4]):
            raise Mismatch("a module argument was not recorded as one")
        _write_back(module_tensors(given), tree[3])
        for module, training in zip(modules, tree[4]):
            module.training = training  # put in eval mode (or back in training mode) by the call
        _write_back_attributes(given, tree[5])
    elif tag == "stateful" and len(tree) == 4 and callable(getattr(given, "load_state_dict", None)):
        given.load_state_dict(decode(tree[3]))
    elif tag == "object" and len(tree) == 4 and isinstance(getattr(given, "__dict__", None), dict):
        _write_back_attributes(given, tree[3])
    elif isinstance(given, torch.Generator):
        if tag != "generator" or len(tree) != 2 or type(tree[1]) is not torch.Tensor:
            raise Mismatch("a generator argument was not recorded as one")
        given.set_state(tree[1])
    elif isinstance(given, torch.Tensor):
        if tag != "tensor" or len(tree) != 4:
            raise Mismatch("an argument changed type in place")
        after, grad = tree[1], tree[3]
        if type(after) is not torch.Tensor or after.shape != given.shape or after.dtype != given.dtype:
            raise Mismatch("an argument changed shape or type in place")
        if not torch.equal(after, given.detach()):
            with torch.no_grad():
                given.copy_(after)
        if given.is_leaf and type(tree[2]) is bool and tree[2] != given.requires_grad and \
                (given.is_floating_point() or given.is_complex()):
            given.requires_grad_(tree[2])  # a weight frozen (or unfrozen) by the call
        if given.is_leaf and given.requires_grad:
            if grad is None:
                given.grad = None
            elif type(grad) is torch.Tensor and grad.shape == given.shape and \
                    (given.grad is None or not torch.equal(grad, given.grad)):
                given.grad = grad.clone()
    elif isinstance(given, pathlib.PurePath):
        if tag != "path" or len(tree) != 3 or tree[1] != given.name or not (tree[2] is None or type(tree[2]) is bytes):
            raise Mismatch("a path argument was not recorded as one")
        _write_back_file(pathlib.Path(given), tree[2])
    elif type(given) is Iterated and tag == "iterated" and type(tree[1]) is list and len(given) == len(tree[1]):
        for item, item_tree in zip(given, tree[1]):
            _write_back(item, item_tree)
    elif isinstance(given, (list, tuple)) and tag in ("list", "tuple") and len(given) == len(tree[1]):
        for index, (item, item_tree) in enumerate(zip(given, tree[1])):
            if _replaceable(item, item_tree):
                if same(_encode_or_none(item), item_tree):
                    continue
                if not isinstance(given, list):
                    raise Mismatch("an item of a tuple changed")
                given[index] = decode(item_tree)  # an item replaced (or a number changed) in a list
            else:
                _write_back(item, item_tree)
    elif isinstance(given, list) and tag == "list":  # items appended or removed in place
        given[:] = [given[i] if type(t) is tuple and t[:1] == ("unchanged",) and i < len(given) else decode(t)
                    for i, t in enumerate(tree[1])]
    elif isinstance(given, dict) and tag in ("dict", "odict", "defaultdict"):
        kept = set()
        for key_tree, value_tree in tree[-1]:
            key = decode(key_tree)
            kept.add(key)
            if key in given and not _replaceable(given[key], value_tree):
                _write_back(given[key], value_tree)
            else:
                given[key] = decode(value_tree)
        for key in [key for key in given if key not in kept]:  # entries the call removed
            del given[key]


def _write_back_attributes(given, pairs) -> None:
    """What a call did to the plain attributes of an object of the course's or the test's (a module's
    log of its calls, a tokenizer's vocabulary), done to the judge's."""
    if type(pairs) is not list:
        raise Mismatch("an argument was recorded malformed")
    for pair in pairs:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not str:
            raise Mismatch("an argument was recorded malformed")
        key, item_tree = pair
        if key in vars(given) and not _replaceable(vars(given)[key], item_tree):
            _write_back(vars(given)[key], item_tree)
        elif not same(_encode_or_none(vars(given).get(key)), item_tree):
            given.__dict__[key] = decode(item_tree)


def _write_back_file(path, content) -> None:
    """What the call left in the file the test named (a checkpoint it saved), left in the judge's.
    The judge's test reads it as it would the student's (``torch.load(weights_only=True)``)."""
    current = path.read_bytes() if path.is_file() else None
    if content == current:
        return
    if content is None:
        if path.is_file():
            path.unlink()  # the call removed the file
        return
    if path.exists() and not path.is_file():
        raise Mismatch("a file recorded where the judge has a folder")
    path.write_bytes(content)


def _same_handle(given, tree) -> bool:
    """Whether ``tree`` records the student's object the judge's stand-in ``given`` stands for."""
    handles = transcript.HANDLES
    return type(tree) is tuple and len(tree) == 9 and tree[0] == "handle" and handles is not None \
        and handles.owns(given) and handles.number(given) == tree[1]


def _write_back_parts(given, attributes, parameters, buffers, submodules, root=None, path="", prune=True) -> None:
    """What a call did to an object of the student's class (its attributes, parameters, buffers and
    submodules, recorded by ``utils/handles.py``), done to the judge's stand-in (or to a module of
    torch's, the course's or the test's, or one inside them). ``root`` is the object the record
    starts from (a tied weight is recorded as ``("same", its path from there)``) and ``path`` the
    way from it to ``given``; ``prune``: attributes the record lacks are removed (a student's object
    whose state stopped being data), not on a module of the test's (an attribute that cannot cross)."""
    _pairs = _handles._pairs
    root = given if root is None else root
    prefix = f"{path}." if path else ""
    recorded = {key for key, _ in _pairs(attributes)}
    for key in [key for key in vars(given) if prune and key not in recorded and not (
            isinstance(given, torch.nn.Module) and key in _handles._MODULE_INTERNALS)]:
        del given.__dict__[key]  # no longer data on the student's side (an optimizer's state by tensor)
    for key, tree in _pairs(attributes):
        if type(tree) is tuple and tree[:1] == ("same",):
            given.__dict__[key] = _at_path(root, tree)  # shared with a tensor written back before
            continue
        if type(tree) is tuple and tree[:1] == ("argument",):
            given.__dict__[key] = transcript.HANDLES.argument(tree)
            continue
        current = vars(given).get(key)
        if key in vars(given) and not _replaceable(current, tree):
            _write_back(current, tree)
        elif not same(_encode_or_none(current), tree):
            given.__dict__[key] = decode(tree)
    if not isinstance(given, torch.nn.Module):
        return
    for table, kind in ((given._parameters, "parameter"), (given._buffers, "buffer")):
        for key, tree in _pairs(parameters if kind == "parameter" else buffers):
            if type(tree) is tuple and tree[:1] == ("same",):
                table[key] = _at_path(root, tree)  # a tied weight, tied again (to a new tensor if need be)
                continue
            if type(tree) is tuple and tree[:1] == ("argument",):
                table[key] = transcript.HANDLES.argument(tree)
                continue
            current = table.get(key)
            if current is not None and not _replaceable(current, tree):
                _write_back(current, tree)
                continue
            value = decode(tree)
            if value is not None and type(value) is not torch.Tensor:
                raise Mismatch(f"a {kind} recorded as something else than a tensor")
            if value is not None and kind == "parameter":
                grad, value = value.grad, torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
                value.grad = grad
            table[key] = value
    for key, tree in _pairs(submodules):
        current = given._modules.get(key)
        tag = tree[0] if type(tree) is tuple and tree else None
        if tag == "handle" and current is not None and _same_handle(current, tree):
            _write_back_parts(current, *tree[5:], root=root, path=prefix + key)
        elif tag == "torchmodule" and len(tree) == 7 and current is not None \
                and (type(current).__module__, type(current).__qualname__) == tree[1:3]:
            _write_back_parts(current, *tree[3:], root=root, path=prefix + key, prune=prune)
        elif tag == "argument" and current is transcript.HANDLES.argument(tree):
            pass
        elif tag == "was" and len(tree) == 4 and type(tree[3]) is tuple and len(tree[3]) == 7:
            try:
                target = transcript.HANDLES.place(tree)  # the judge's own layer, moved here
            except ValueError:
                raise Mismatch("a recorded layer that was nowhere") from None
            given._modules[key] = target
            _write_back_module(target, tree[3], root, prefix + key, prune)
        else:
            try:
                given._modules[key] = transcript.HANDLES.submodule(tree, _Tied(root), prefix + key)
            except (ValueError, AttributeError):
                raise Mismatch("a submodule recorded malformed") from None


def write_back_module(module, tree) -> None:
    """What a call did to a module of torch's, the course's or the test's, recorded by its parts
    (``("torchmodule", ...)``), done to the judge's."""
    _write_back_module(module, tree, None, "", False)


def _write_back_module(module, tree, root, path, prune) -> None:
    if type(tree) is not tuple or len(tree) != 7 or tree[0] != "torchmodule" \
            or (type(module).__module__, type(module).__qualname__) != tree[1:3]:
        raise Mismatch("a module was not recorded as one")
    _write_back_parts(module, *tree[3:], root=root, path=path, prune=prune)


def _at_path(root, tree):
    """The judge's tensor a recorded ``("same", "a.b.weight")`` names: through ``root``'s submodules
    to a parameter, buffer or attribute."""
    if type(tree) is not tuple or len(tree) != 2 or type(tree[1]) is not str:
        raise Mismatch("a recorded reference to no tensor")
    *modules, name = tree[1].split(".")
    owner = root
    for part in modules:
        owner = getattr(owner, "_modules", {}).get(part)
        if owner is None:
            raise Mismatch("a recorded reference to no tensor")
    for table in (getattr(owner, "_parameters", {}), getattr(owner, "_buffers", {}), vars(owner)):
        if isinstance(table.get(name), torch.Tensor):
            return table[name]
    raise Mismatch("a recorded reference to no tensor")


class _Tied(dict):
    """The tensors a new submodule may share, by path from ``root`` (``StandIns.fill``'s ``seen``):
    the judge's own, already written back."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __contains__(self, path):
        try:
            return super().__contains__(path) or self[path] is not None
        except Mismatch:
            return False

    def __missing__(self, path):
        return _at_path(self.root, ("same", path))


def _replaceable(item, tree) -> bool:
    """Whether the recorded ``tree`` is not ``item`` changed in place but another value put in its
    place (a number in a list, a tensor of another shape in a dict)."""
    tag = tree[0] if type(tree) is tuple and tree else None
    if tag in ("unchanged", "callback"):
        return False
    if tag == "path" and isinstance(item, pathlib.PurePath):
        return False  # the file it names was written back
    if tag == "handle":
        return not _same_handle(item, tree)
    if tag == "argument":
        return True  # the judge's own argument, put in its place
    if isinstance(item, torch.Tensor):
        return tag != "tensor" or type(tree[1]) is not torch.Tensor or tree[1].shape != item.shape \
            or tree[1].dtype != item.dtype
    if isinstance(item, dict) and tag not in ("dict", "odict", "defaultdict"):
        return True
    if isinstance(item, (list, dict, torch.nn.Module, torch.Generator)) or tag in ("stateful", "object", "module",
                                                                                  "torchmodule"):
        return False
    if isinstance(item, tuple) and tag in ("list", "tuple") and len(tree[1]) == len(item):
        return False  # its items were written back (a tuple of tensors changed in place)
    return True  # immutable: only replaced


def _encode_or_none(value):
    try:
        return encode(value)
    except Opaque:
        return None
