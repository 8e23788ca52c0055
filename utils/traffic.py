"""A rank's communication during a recorded call, as data (Phase 7's tests grade *how* ranks talk).

In the verifier, ``Recording`` (a dispatch mode around each call a test makes into the student's
code inside a rank) writes down every c10d operation the call launches: which one, its arguments
with the tensors as they were when it was launched, and its tensors once it completed (what a
``recv`` received, what an ``all_reduce`` summed). In the judge, ``replay`` launches the same
operations for real on the judge's own ranks, from the recorded tensors. So the test's ``CommLog``
counts bytes the judge itself sent (its lower bounds, "a ring sends at least (N-1)/N of the
tensor", hold on real traffic, not on a log the student's process kept), and every buffer must
receive what the student's rank recorded: a message no other rank recorded sending never arrives,
and a sum that is not the sum of what the ranks recorded sending differs.

Only the operations below, on the default group, cross; anything else (a subgroup, a functional
collective, a buffer read before its operation completed) leaves the test undecided.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from utils.transcript import Opaque, same, unseen

# The c10d operators ``torch.distributed``'s functions reach, by name: the judge launches nothing else.
OPERATORS = ("send", "recv_", "allreduce_", "_reduce_scatter_base_", "reduce_scatter_", "_allgather_base_",
             "allgather_", "broadcast_", "barrier", "reduce_", "gather_", "scatter_", "alltoall_base_", "alltoall_")
# Operators whose tensors only go out: their record is complete when they are launched (a student's
# ``isend`` waited for late, or never, is common and harmless).
_OUTGOING = ("send", "barrier")
# A receive completes when the student's code waits for it (its buffer is read when it has; see
# ``Recording._settle``). A collective is waited for as soon as it is launched: every rank launches
# it, so waiting cannot block one that another rank needs first, and gloo's reduce-scatter
# never reports itself completed.
_RECEIVING = ("recv_",)
_GROUP = "__torch__.torch.classes.c10d.ProcessGroup"
_REDUCE_OP = "__torch__.torch.classes.c10d.ReduceOp"
_TYPES = ("Tensor", "Optional[Tensor]", "List[Tensor]", "List[List[Tensor]]", "int", "bool", "List[int]",
          _GROUP, _REDUCE_OP)


def in_rank() -> bool:
    """Whether this process is a rank of a process group (where calls are recorded with their traffic)."""
    return dist.is_available() and dist.is_initialized()


def _kinds(operator, given: int) -> list[str] | None:
    """The types of an operator's first ``given`` arguments; None when more are given than it takes,
    or fewer than it needs (the dispatcher leaves trailing defaults out)."""
    arguments = operator._schema.arguments
    if given > len(arguments) or any(not a.has_default_value() for a in arguments[given:]):
        return None
    return [str(argument.type) for argument in arguments[:given]]


def _tensors(args) -> list:
    return [value for value in tree_flatten(list(args))[0] if isinstance(value, torch.Tensor)]


def _span(tensor):
    """(storage address, first byte, last byte + 1) that ``tensor`` can touch, or None if empty."""
    if tensor.numel() == 0:
        return None
    last = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    size = tensor.element_size()
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset() * size, (tensor.storage_offset() + last + 1) * size


def _overlap(first: list, second: list) -> bool:
    spans = [s for s in map(_span, first) if s is not None]
    for other in map(_span, second):
        if other is not None and any(s[0] == other[0] and s[1] < other[2] and other[1] < s[2] for s in spans):
            return True
    return False


# ---------------------------------------------------------------------------
# The verifier's side
# ---------------------------------------------------------------------------

def _encode(value, kind: str):
    if kind == "Tensor" or (kind == "Optional[Tensor]" and value is not None):
        if type(value) is not torch.Tensor:
            raise Opaque(f"{type(value).__name__} sent")
        return value.detach().clone()
    if kind == "Optional[Tensor]":
        return None
    if kind in ("List[Tensor]", "List[List[Tensor]]", "List[int]"):
        inner = {"List[Tensor]": "Tensor", "List[List[Tensor]]": "List[Tensor]", "List[int]": "int"}[kind]
        return [_encode(item, inner) for item in value]
    if kind in ("int", "bool"):
        if type(value) is not {"int": int, "bool": bool}[kind]:
            raise Opaque(type(value).__name__)
        return value
    if kind == _GROUP:
        if dist.ProcessGroup.unbox(value) != dist.group.WORLD:
            raise Opaque("a process group other than the default one")
        return ("group",)
    if kind == _REDUCE_OP:
        code = int(value.op())
        if code == int(dist.ReduceOp.PREMUL_SUM):
            raise Opaque("a scaled sum")
        return ("reduce_op", code)
    raise Opaque(kind)


def _work(result):
    """The ``Work`` an operator returned (alone, or last in a tuple), as a Python object."""
    if isinstance(result, tuple):
        result = result[-1]
    return dist.Work.unbox(result)


class Recording(TorchDispatchMode):
    """Writes down the c10d operations launched inside it (see the module docstring) in ``ops``;
    ``problem`` says why they cannot cross, if they cannot."""

    def __init__(self):
        super().__init__()
        self.ops: list[dict] = []
        self.pending: list = []  # (record, its tensors, its Work): launched, not yet seen completed
        self.problem: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending:
            self._settle(_tensors((args, kwargs)))
        if getattr(func, "namespace", "") not in ("c10d", "_c10d_functional", "c10d_functional"):
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        record = None
        kinds = _kinds(func, len(args))
        if name not in OPERATORS or func._overloadname != "default" or kwargs or kinds is None:
            self.problem = self.problem or f"a call of {func} (only {', '.join(OPERATORS)} cross)"
        else:
            with unseen():
                try:
                    record = {"op": name, "args": [_encode(a, k) for a, k in zip(args, kinds)]}
                except Opaque as error:
                    self.problem = self.problem or f"{name} with {error}"
        result = func(*args, **kwargs)
        if record is not None:
            self.ops.append(record)
            if name in _OUTGOING:
                record["after"] = _tensors(record["args"])
            elif name in _RECEIVING:
                self.pending.append((record, _tensors(args), _work(result)))
            else:
                _work(result).wait()
                with unseen():
                    record["after"] = [t.detach().clone() for t in _tensors(args)]
        return result

    def _settle(self, touched: list) -> None:
        """Read the buffers of every receive that has completed; one that the student's code touches
        before it completed cannot be recorded (a race of the student's)."""
        still = []
        for record, tensors, work in self.pending:
            if work.is_completed():
                with unseen():
                    record["after"] = [t.detach().clone() for t in tensors]
            else:
                if _overlap(tensors, touched):
                    self.problem = self.problem or f"a buffer of {record['op']} used before it completed"
                still.append((record, tensors, work))
        self.pending = still

    def finish(self) -> None:
        """At the end of the call: every operation it launched must have completed."""
        self._settle([])
        if self.pending:
            self.problem = self.problem or f"{self.pending[0][0]['op']} still running when the call returned"


# ---------------------------------------------------------------------------
# The judge's side
# ---------------------------------------------------------------------------

_reduce_ops: dict = {}


class _Captured(Exception):
    pass


class _Capture(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise _Captured(args)


def _reduce_op(code: int):
    """The c10d ``ReduceOp`` object for a ``dist.ReduceOp`` code. Python cannot build one but the
    sum, so it is taken from an all-reduce stopped before it sends anything."""
    if code not in _reduce_ops:
        kinds = {int(k): k for k in dist.ReduceOp.RedOpType.__members__.values()}
        if code not in kinds or code == int(dist.ReduceOp.PREMUL_SUM):
            raise ValueError("an unknown reduction")
        options = dist.AllreduceOptions()
        options.reduceOp = kinds[code]
        with unseen():
            dummy = torch.zeros(1)
        try:
            with _Capture():
                dist.group.WORLD.allreduce([dummy], options)
        except _Captured as captured:
            _reduce_ops[code] = captured.args[0][2]
        else:
            raise ValueError("the reduction could not be captured")
    return _reduce_ops[code]


def _decode(value, kind: str):
    if kind == "Tensor" or (kind == "Optional[Tensor]" and value is not None):
        if type(value) is not torch.Tensor:
            raise ValueError("a tensor recorded as something else")
        with unseen():
            return value.clone()
    if kind == "Optional[Tensor]":
        return None
    if kind in ("List[Tensor]", "List[List[Tensor]]", "List[int]"):
        if type(value) is not list:
            raise ValueError("a list recorded as something else")
        inner = {"List[Tensor]": "Tensor", "List[List[Tensor]]": "List[Tensor]", "List[int]": "int"}[kind]
        return [_decode(item, inner) for item in value]
    if kind in ("int", "bool"):
        if type(value) is not {"int": int, "bool": bool}[kind]:
            raise ValueError("a number recorded as something else")
        return value
    if kind == _GROUP and value == ("group",):
        return dist.group.WORLD.boxed()
    if kind == _REDUCE_OP and type(value) is tuple and len(value) == 2 and value[0] == "reduce_op" \
            and type(value[1]) is int:
        return _reduce_op(value[1])
    raise ValueError("an argument recorded malformed")


def replay(ops) -> None:
    """Launch the recorded operations on this rank of the judge, all before waiting for any (the
    student's rank waited somewhere in between; launched early, none can wait for another), then
    check that each left its tensors as they were recorded. Raises ``ValueError`` otherwise."""
    if not in_rank():
        raise ValueError("communication recorded where the judge has no ranks")
    if type(ops) is not list:
        raise ValueError("the recorded communication is malformed")
    launched = []
    for record in ops:
        if type(record) is not dict or record.get("op") not in OPERATORS or type(record.get("args")) is not list \
                or type(record.get("after")) is not list:
            raise ValueError("the recorded communication is malformed")
        operator = getattr(torch.ops.c10d, record["op"]).default
        kinds = _kinds(operator, len(record["args"]))
        if kinds is None or any(kind not in _TYPES for kind in kinds):
            raise ValueError("the recorded communication is malformed")
        args = [_decode(value, kind) for value, kind in zip(record["args"], kinds)]
        try:
            work = _work(operator(*args))
        except Exception as error:  # noqa: BLE001 - a forged peer or size: gloo refuses it
            raise ValueError(f"a recorded {record['op']} cannot be launched ({type(error).__name__})") from None
        launched.append((record, args, work))
    for record, args, work in launched:
        try:
            work.wait()
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"a recorded {record['op']} failed here ({type(error).__name__})") from None
        tensors = _tensors(args)
        if len(tensors) != len(record["after"]) or not all(
                type(b) is torch.Tensor and same(a.detach(), b) for a, b in zip(tensors, record["after"])):
            raise ValueError(f"a {record['op']} here did not leave what it left in the student's rank")
