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

Beside the values, a call carries what a test may watch of *how* it ran: inside a rank, what it
sent and received (``utils/traffic.py``); under a watching dispatch mode, the operators it ran
(``utils/trace.py``); the calls of a module argument's hooked layers (``_fire_hooks``). What a
stub makes of the judge's own arguments after the call is ``utils/write_back.py``'s.
"""

from __future__ import annotations

import contextlib
import types

import torch

from utils import handles as _handles, trace as _trace, traffic as _traffic, transcript, write_back as _write_back
# Mismatch and Undecidable are replay's errors (defined with the record's format, raised here and
# in utils/write_back.py); the judge and the ranks catch them as replay.Mismatch, replay.Undecidable.
from utils.transcript import (Callback, Iterated, Mismatch, Opaque, Undecidable, decode, encode, global_state,
                              map_tensors, same, set_global_state, state_changes, tensors_in, unseen, versions_of)

# Errors a replayed call may raise again in the judge (a test may expect the student's function to
# raise one); any other recorded error becomes a RuntimeError.
ERRORS = {cls.__name__: cls for cls in (
    TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError, NotImplementedError,
    ZeroDivisionError, AssertionError, OverflowError, StopIteration, ArithmeticError, LookupError,
    MemoryError)}


# The Recorder (in the verifier) or the Replay (in the judge) of the test cell being graded: the
# ranks ``utils.distributed.launch`` starts record, or replay, their own calls through it.
ACTIVE = None


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
            hooked = {key: (layer, place) for key, (layer, place) in places.items()
                      if layer._forward_hooks or layer._forward_pre_hooks}
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
                        _write_back.write_back(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)), entry["after"])
                raise ERRORS.get(entry["raised"], RuntimeError)()
            if "result" not in entry:
                raise Mismatch(f"the recorded call of {name} has no result")
            with unseen(), _handles.given(replay.handles, args, kwargs, places):
                _write_back.write_back(_with_callbacks(args, kwargs, lambda slot, f: Callback(slot)), entry["after"])
                result = _write_back.result(entry["result"], args, kwargs)
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
