"""Run a function on N ranks from a notebook cell, with real ``torch.distributed``.

>>> def worker(scale):
...     x = torch.ones(3) * (dist.get_rank() + 1)
...     dist.all_reduce(x)                     # every rank now holds 1 + 2 + ... + N
...     return x * scale
>>> distributed.launch(worker, 4, 10.0)        # one return value per rank, in rank order
[tensor([100., 100., 100.]), tensor([100., 100., 100.]), ...]

What ``launch`` does for you:

* starts ``world_size`` processes (*ranks*), joins them in one process group and calls
  ``fn(*args, **kwargs)`` in each; inside, ``dist.get_rank()`` and ``dist.get_world_size()``
  say who is who, and :func:`device` is the rank's device;
* chooses the backend: NCCL with one GPU per rank when there are enough GPUs, otherwise
  gloo on the CPU (a laptop "simulates" N devices with N processes);
* prints what the ranks print, each line prefixed with ``[rank k]``;
* returns the ranks' return values (tensors are detached and moved to the CPU);
* when a rank raises, raises :class:`RankError` in the notebook with that rank's traceback;
* when the ranks do not finish in ``timeout`` seconds (a deadlock: a ``recv`` nobody sends to,
  a collective one rank skips), raises :class:`LaunchTimeout` saying where each rank was
  stuck, and kills every process it started.

The same worker runs unchanged on a multi-GPU machine under ``torchrun``. Put it in a script::

    # train.py
    from utils import distributed
    from my_workers import worker
    if __name__ == "__main__":
        results = distributed.run_under_torchrun(worker, 10.0)
        if results is not None:          # rank 0 gets every rank's return value
            print(results)

and start ``torchrun --standalone --nproc-per-node 4 train.py`` (or ``python -m
torch.distributed.run ...``). ``run_under_torchrun`` joins the group torchrun prepared, with
NCCL and one GPU per process when there are GPUs, gloo otherwise.

How it is built, and why (measured on a 2-core laptop-class CPU, torch 2.13):

* On Linux the ranks are *forked* from the notebook: 4 ranks start in ~0.1 s and see
  functions defined in notebook cells. A forked rank calls ``torch.set_num_threads(1)`` before
  any maths: a fork of a process whose thread pool already ran can hang on its first matmul.
  With NCCL (and on macOS or Windows) ranks are fresh interpreters (*spawned*, ~1 s each) and
  the function travels with ``cloudpickle``, because CUDA cannot be used after a fork.
* The ranks meet through a file in a fresh temporary folder (``file://`` rendezvous): no TCP
  port is fixed, so many launches, and notebooks side by side, never collide.
* Each rank leads its own process group, so a hung rank and anything it started can be
  killed; a rank also exits by itself when the notebook's kernel dies.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import os
import pickle
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import torch
# The first optimizer a process creates imports torch's compiler stack (~1.5 s). Imported here,
# once, every forked rank inherits it instead of paying it again.
import torch._dynamo  # noqa: F401
import torch.distributed as dist

from . import runtime

__all__ = ["launch", "run_under_torchrun", "run_with_torchrun", "device", "choose_backend", "RankError",
           "LaunchTimeout", "reduce_scatter_single", "all_gather_single"]

# PyTorch 2.13 renamed the flat-tensor collectives (the old names still work, with a warning).
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Set in every rank this module starts, so that a nested launch fails clearly.
_RANK_ENV = "COURSE_LAUNCH_RANK"
_GRACE_AFTER_ERROR = 0.5  # seconds the other ranks get to report their own error
_GRACE_AFTER_RESULTS = 5.0  # seconds a rank that returned gets to exit cleanly


class RankError(RuntimeError):
    """A rank raised (or died). ``rank`` is the rank, ``remote_traceback`` its traceback as text."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "",
                 exception_type: str = ""):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exception_type = exception_type


class LaunchTimeout(TimeoutError):
    """The ranks did not all finish in time (usually a deadlock). ``stacks`` maps each unfinished
    rank to where it was waiting."""

    def __init__(self, message: str, stacks: dict[int, str] | None = None):
        super().__init__(message)
        self.stacks = stacks or {}


# ---------------------------------------------------------------------------------------------
# Backend and device
# ---------------------------------------------------------------------------------------------

def choose_backend(world_size: int) -> tuple[str, str]:
    """``(backend, start_method)`` for ``world_size`` ranks on this machine.

    ``("nccl", "spawn")`` when CUDA and NCCL are available with at least one GPU per rank;
    otherwise ``("gloo", "fork")`` on Linux and ``("gloo", "spawn")`` elsewhere (forking a
    process that uses Apple's frameworks is unsafe). ``COURSE_DEVICE=cpu`` forces gloo.
    """
    forced_cpu = os.environ.get("COURSE_DEVICE", "").startswith("cpu")
    if (not forced_cpu and torch.cuda.is_available() and dist.is_nccl_available()
            and torch.cuda.device_count() >= world_size):
        return "nccl", "spawn"
    return "gloo", ("fork" if sys.platform.startswith("linux") else "spawn")


def device() -> torch.device:
    """The device of the calling rank: its own GPU under NCCL, else the CPU.

    Create tensors with ``device=distributed.device()`` and the same worker runs on
    simulated CPU ranks and on real GPUs.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _loopback_interface() -> str | None:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def _to_cpu(value):
    """Tensors detached and on the CPU, inside lists, tuples and dicts, so they can travel back."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        converted = copy.copy(value)  # keeps the type (OrderedDict, defaultdict...)
        for key, item in value.items():
            converted[key] = _to_cpu(item)
        return converted
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_to_cpu(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# Inside a rank
# ---------------------------------------------------------------------------------------------

@dataclass
class _RankConfig:
    rank: int
    world_size: int
    backend: str
    init_method: str
    timeout: float
    grading: bool
    sys_path: list = field(default_factory=list)


def _watch_parent(fd: int) -> None:
    """Exit as soon as the notebook's kernel is gone (the pipe it holds open reaches EOF)."""
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    os._exit(3)


def _rank_main(config: _RankConfig, fn: Callable, args: tuple, kwargs: dict, result_fd: int,
               lifeline_fd: int) -> None:
    """Body of every rank: join the group, run ``fn``, send back its result or its traceback."""
    os.environ[_RANK_ENV] = str(config.rank)
    threading.Thread(target=_watch_parent, args=(lifeline_fd,), daemon=True).start()
    message: tuple
    try:
        if config.backend == "nccl":
            torch.cuda.set_device(config.rank)
        kwargs_pg = {}
        if config.backend == "nccl":
            kwargs_pg["device_id"] = torch.device("cuda", config.rank)
        # A slack on top of the launcher's own deadline: the launcher's message is the clearer one.
        dist.init_process_group(config.backend, init_method=config.init_method, rank=config.rank,
                                world_size=config.world_size,
                                timeout=datetime.timedelta(seconds=config.timeout + 30), **kwargs_pg)
        hooks = _grading_hooks()
        if hooks is not None:
            hooks.enter_rank(config.rank)
        result = fn(*args, **kwargs)
        # While autograded: the calls this rank's code made into the student's functions.
        calls = hooks.leave_rank() if hooks is not None else None
        try:
            message = ("ok", cloudpickle.dumps(_to_cpu(result)), calls)  # notebook-defined classes too
        except Exception as error:  # noqa: BLE001 - any pickling failure is the same problem
            message = ("error", f"rank {config.rank} returned a value that cannot be sent back to the "
                                f"notebook ({type(error).__name__}: {error}). Return tensors, numbers, "
                                "strings, or lists and dicts of them.", "", type(error).__name__)
    except BaseException as error:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are reported too
        tb = traceback.TracebackException.from_exception(error)
        # Leave out this function's own frame: the traceback starts in the student's code.
        if tb.stack and tb.stack[0].filename == __file__:
            tb.stack = traceback.StackSummary.from_list(tb.stack[1:])
        message = ("error", f"{type(error).__name__}: {error}", "".join(tb.format()), type(error).__name__)
    sys.stdout.flush()
    sys.stderr.flush()
    _write_all(result_fd, pickle.dumps(message))
    os.close(result_fd)
    if message[0] == "ok" and dist.is_initialized():
        # Nobody leaves while a peer may still be reading from it.
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is already sent
            pass


def _grading_hooks():
    """The recorder (in the verifier) or the replay (in the judge) of the test cell being graded,
    when there is one (``utils/replay.py``): ranks record, or replay, their own calls."""
    replay = sys.modules.get("utils.replay")
    return getattr(replay, "ACTIVE", None)


def _write_all(fd: int, data: bytes) -> None:
    data = struct.pack("<Q", len(data)) + data
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _prepare_rank_process(config: _RankConfig, dump_fd: int) -> None:
    """Settings every rank needs before any tensor maths, forked or spawned."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # On request (SIGUSR1) the rank writes where it is to the launcher: a deadlock report.
    faulthandler.register(signal.SIGUSR1, file=dump_fd, all_threads=False, chain=False)
    # A crash report goes through the rank's own stderr, not to a file the parent had set.
    faulthandler.enable(file=sys.stderr)
    loopback = _loopback_interface()
    if config.backend == "gloo" and loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    if config.grading:
        warnings.simplefilter("ignore")


def _forked_rank(config: _RankConfig, fn, args, kwargs, fds: "_RankFds", all_fds: list[int]) -> None:
    """Entry point of a forked rank. Never returns."""
    code = 0
    try:
        os.setpgid(0, 0)
        for fd in all_fds:
            if fd not in (fds.out_w, fds.err_w, fds.result_w, fds.dump_w, fds.lifeline_r):
                os.close(fd)
        os.dup2(fds.out_w, 1)
        os.dup2(fds.err_w, 2)
        os.close(fds.out_w)
        os.close(fds.err_w)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        _prepare_rank_process(config, fds.dump_w)
        _rank_main(config, fn, args, kwargs, fds.result_w, fds.lifeline_r)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the notebook
        code = 1
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)


# Runs in a spawned rank: `python -c _SPAWN_BOOTSTRAP`, the job arriving on stdin.
_SPAWN_BOOTSTRAP = """
import os, pickle, struct, sys
data = b""
while len(data) < 8:
    data += os.read(0, 8 - len(data))
size = struct.unpack("<Q", data)[0]
data = b""
while len(data) < size:
    data += os.read(0, size - len(data))
path, fds, payload = pickle.loads(data)
sys.path[:] = path
from utils import distributed
distributed._spawned_rank(fds, payload)
"""


def _spawned_rank(fds: tuple[int, int], payload: bytes) -> None:
    """Entry point of a spawned rank (stdout and stderr are already the launcher's pipes)."""
    result_fd, dump_fd = fds
    config, fn, args, kwargs = pickle.loads(payload)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    _prepare_rank_process(config, dump_fd)
    _rank_main(config, fn, args, kwargs, result_fd, lifeline_fd=0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# The launcher, in the notebook's process
# ---------------------------------------------------------------------------------------------

@dataclass
class _RankFds:
    """The pipes between the launcher and one rank: read ends (``*_r``) stay in the notebook,
    write ends (``*_w``) go to the rank."""

    out_r: int
    out_w: int
    err_r: int
    err_w: int
    result_r: int
    result_w: int
    dump_r: int
    dump_w: int
    lifeline_r: int = -1

    @classmethod
    def new(cls, lifeline_r: int) -> "_RankFds":
        ends = []
        for _ in range(4):
            ends += os.pipe()
        return cls(*ends, lifeline_r=lifeline_r)

    def writers(self) -> list[int]:
        return [self.out_w, self.err_w, self.result_w, self.dump_w]

    def readers(self) -> list[int]:
        return [self.out_r, self.err_r, self.result_r, self.dump_r]


@dataclass
class _Rank:
    """What the launcher knows about one rank while it runs."""

    rank: int
    pid: int
    fds: _RankFds
    popen: Any = None  # spawned ranks only
    result: bytes = b""
    message: tuple | None = None  # ("ok", payload) | ("error", summary, traceback, type) | ("missing",)
    reported_at: float = 0.0
    dump: bytes = b""
    partial: dict = field(default_factory=lambda: {"out": b"", "err": b""})
    exit_status: int | None = None
    exited_at: float = 0.0


def launch(fn: Callable, world_size: int, *args, kwargs: dict | None = None, timeout: float = 30.0,
           backend: str | None = None, start_method: str | None = None) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return their results in rank order.

    * ``fn`` may be defined in a notebook cell. Inside it, use ``torch.distributed`` as usual
      (``dist.get_rank()``, ``dist.all_reduce(...)``, ``dist.send(...)``): the process group is
      ready. Put tensors on ``distributed.device()``.
    * ``timeout`` (seconds) bounds the whole run: past it, :class:`LaunchTimeout` tells where
      each unfinished rank was waiting, and every rank is killed.
    * ``backend`` (``"gloo"`` or ``"nccl"``) and ``start_method`` (``"fork"`` or ``"spawn"``)
      are chosen by :func:`choose_backend` when left out.

    A rank that raises makes ``launch`` raise :class:`RankError` with that rank's traceback.
    What ranks print appears below the cell, prefixed with ``[rank k]``; while nbgrader grades,
    what they write to stderr (warnings) is shown on stdout, so that it cannot cost marks.
    """
    if not callable(fn):
        raise TypeError(f"launch needs a function to run on every rank, not {type(fn).__name__}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, not {world_size!r}")
    if os.environ.get(_RANK_ENV) is not None:
        raise RuntimeError("launch was called inside a rank: a rank cannot start ranks of its own. "
                           "Call launch from the notebook, once, with the world size you need.")
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("this process already belongs to a process group (init_process_group was "
                           "called here); launch starts its own ranks. Call dist.destroy_process_group() "
                           "first, or restart the kernel.")
    chosen_backend, chosen_start = choose_backend(world_size)
    backend = backend or chosen_backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', not {backend!r}")
    start_method = start_method or ("spawn" if backend == "nccl" else chosen_start)
    if start_method not in ("fork", "spawn"):
        raise ValueError(f"start_method must be 'fork' or 'spawn', not {start_method!r}")
    if start_method == "fork" and not hasattr(os, "fork"):
        raise ValueError("this system cannot fork: use start_method='spawn'")
    if backend == "nccl" and start_method == "fork":
        raise ValueError("NCCL ranks must be spawned: CUDA cannot be used in a forked process")

    grading = runtime.is_grading()
    hooks = _grading_hooks()
    if hooks is not None:
        hooks.launching(world_size, start_method)
    store_dir = tempfile.mkdtemp(prefix="course-launch-")
    ranks: list[_Rank] = []
    open_fds: set[int] = set()
    lifeline_r = lifeline_w = -1
    try:
        if start_method == "fork":
            lifeline_r, lifeline_w = os.pipe()
            open_fds |= {lifeline_r, lifeline_w}
        # Every pipe exists before the first rank starts, so that a forked rank can close all
        # the pipes that are not its own (a pipe stays open while any process holds its write end).
        rank_fds = [_RankFds.new(lifeline_r) for _ in range(world_size)]
        for fds in rank_fds:
            open_fds |= set(fds.readers() + fds.writers())
        for rank, fds in enumerate(rank_fds):
            config = _RankConfig(rank=rank, world_size=world_size, backend=backend,
                                 init_method=f"file://{store_dir}/store", timeout=float(timeout),
                                 grading=grading)
            if start_method == "fork":
                ranks.append(_fork_rank(config, fn, args, kwargs or {}, fds, sorted(open_fds)))
            else:
                ranks.append(_spawn_rank(config, fn, args, kwargs or {}, fds))
        for fd in [lifeline_r] + [w for fds in rank_fds for w in fds.writers()]:
            if fd >= 0:
                os.close(fd)
                open_fds.discard(fd)
        results = _supervise(ranks, timeout, grading)
        if hooks is not None:
            hooks.ranks_done([r.message[2] if len(r.message) > 2 else None for r in ranks])
        return results
    finally:
        _kill(ranks)
        for rank in ranks:
            if rank.popen is not None and rank.popen.stdin:
                try:
                    rank.popen.stdin.close()
                except OSError:
                    pass
        for fd in open_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(store_dir, ignore_errors=True)


def _fork_rank(config: _RankConfig, fn, args, kwargs, fds: _RankFds, all_fds: list[int]) -> _Rank:
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process with threads (the kernel's); the rank
        # touches none of the kernel's threads and sets its own thread pool to one thread.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        _forked_rank(config, fn, args, kwargs, fds, all_fds)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the child did it first, or already exited
        pass
    return _Rank(config.rank, pid, fds)


def _spawn_rank(config: _RankConfig, fn, args, kwargs, fds: _RankFds) -> _Rank:
    payload = cloudpickle.dumps((config, fn, args, kwargs))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if config.grading:
        env["PYTHONWARNINGS"] = "ignore"
    # The rank's stdin is its lifeline: it carries the job, then stays open while we live.
    popen = subprocess.Popen([sys.executable, "-c", _SPAWN_BOOTSTRAP], stdin=subprocess.PIPE,
                             stdout=fds.out_w, stderr=fds.err_w, pass_fds=(fds.result_w, fds.dump_w),
                             start_new_session=True, env=env)
    job = pickle.dumps((list(sys.path), (fds.result_w, fds.dump_w), payload))
    try:
        popen.stdin.write(struct.pack("<Q", len(job)) + job)
        popen.stdin.flush()
    except BrokenPipeError:
        pass
    return _Rank(config.rank, popen.pid, fds, popen=popen)


def _supervise(ranks: list[_Rank], timeout: float, grading: bool) -> list:
    """Relay output, collect results and errors, enforce the deadline."""
    selector = selectors.DefaultSelector()
    for rank in ranks:
        for kind, fd in (("out", rank.fds.out_r), ("err", rank.fds.err_r), ("result", rank.fds.result_r),
                         ("dump", rank.fds.dump_r)):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, (rank, kind))
    deadline = time.monotonic() + timeout
    first_failure_at = all_done_at = None
    try:
        while True:
            now = time.monotonic()
            _reap(ranks, now)
            for rank in ranks:
                # Exited, and its result pipe still open a second later: something else holds it.
                if rank.message is None and rank.exit_status is not None and now - rank.exited_at > 1.0:
                    rank.message, rank.reported_at = ("missing",), now
            done = [r for r in ranks if r.message is not None]
            if any(r.message[0] != "ok" for r in done):
                first_failure_at = first_failure_at or now
                if len(done) == len(ranks) or now - first_failure_at > _GRACE_AFTER_ERROR:
                    break
            elif len(done) == len(ranks):
                all_done_at = all_done_at or now
                if all(r.exit_status is not None for r in ranks) or now - all_done_at > _GRACE_AFTER_RESULTS:
                    break
            if now > deadline:
                _timeout(selector, ranks, timeout, grading)
            for key, _ in selector.select(timeout=min(0.05, max(0.0, deadline - now))):
                _read(selector, key, grading)
    finally:
        _drain(selector, grading)
        _flush_partial(ranks, grading)
        selector.close()
    # A rank that died closed its pipes an instant before the system reports its exit status.
    end = time.monotonic() + 1.0
    while any(r.message == ("missing",) and r.exit_status is None for r in ranks) and time.monotonic() < end:
        time.sleep(0.01)
        _reap(ranks, time.monotonic())
    _raise_for_errors(ranks)
    return [pickle.loads(r.message[1]) for r in ranks]


def _read(selector, key, grading: bool) -> None:
    rank, kind = key.data
    try:
        chunk = os.read(key.fd, 65536)
    except BlockingIOError:
        return
    except OSError:
        chunk = b""
    if not chunk:
        selector.unregister(key.fd)
        if kind == "result":
            rank.message, rank.reported_at = _decode(rank.result), time.monotonic()
        return
    if kind == "result":
        rank.result += chunk
    elif kind == "dump":
        rank.dump += chunk
    else:
        _relay(rank, kind, chunk, grading)


def _decode(frame: bytes) -> tuple:
    """The message a rank sent, or ``("missing",)`` when it died before sending all of it."""
    if len(frame) < 8 or len(frame) - 8 != struct.unpack("<Q", frame[:8])[0]:
        return ("missing",)
    return pickle.loads(frame[8:])


def _relay(rank: _Rank, kind: str, chunk: bytes, grading: bool) -> None:
    """Print the complete lines a rank wrote, with its prefix."""
    data = rank.partial[kind] + chunk
    *lines, rank.partial[kind] = data.split(b"\n")
    for line in lines:
        _print_line(rank.rank, kind, line, grading)


def _print_line(rank: int, kind: str, line: bytes, grading: bool) -> None:
    text = f"[rank {rank}] {line.decode('utf-8', errors='replace')}"
    stream = sys.stderr if kind == "err" and not grading else sys.stdout
    print(text, file=stream, flush=True)


def _flush_partial(ranks: list[_Rank], grading: bool) -> None:
    for rank in ranks:
        for kind in ("out", "err"):
            if rank.partial[kind]:
                _print_line(rank.rank, kind, rank.partial[kind], grading)
                rank.partial[kind] = b""


def _drain(selector, grading: bool) -> None:
    """Read what the pipes still hold, without waiting."""
    for _ in range(10_000):
        ready = selector.select(timeout=0)
        if not ready:
            return
        for key, _ in ready:
            _read(selector, key, grading)


def _reap(ranks: list[_Rank], now: float) -> None:
    for rank in ranks:
        if rank.exit_status is None:
            try:
                pid, status = os.waitpid(rank.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = rank.pid, 0
            if pid:
                rank.exit_status, rank.exited_at = status, now
                if rank.popen is not None:
                    rank.popen.returncode = os.waitstatus_to_exitcode(status)


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "was still running"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        hint = {signal.SIGKILL: " (SIGKILL often means the machine ran out of memory)",
                signal.SIGABRT: " (with gloo, SIGABRT often means that a recv's buffer has another size than "
                                "the tensor sent to it)"}.get(number, "")
        return f"was killed by signal {name}{hint}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _raise_for_errors(ranks: list[_Rank]) -> None:
    failed = [r for r in ranks if r.message is not None and r.message[0] != "ok"]
    if not failed:
        return
    # The first failure is the likely cause, except that a rank whose peer died fails too, with a
    # message about the lost connection. Failures at nearly the same time: the lowest rank.
    causes = [r for r in failed if not (r.message[0] == "error" and _peer_lost(r.message[1]))] or failed
    earliest = min(r.reported_at for r in causes)
    first = min((r for r in causes if r.reported_at - earliest < 0.1), key=lambda r: r.rank)
    others = [r for r in failed if r is not first]
    after = ""
    if others:
        lost = [r.rank for r in others if r.message[0] == "error" and _peer_lost(r.message[1])]
        own = [r.rank for r in others if r.rank not in lost]
        if own:
            after += f"\n\nRank(s) {', '.join(map(str, own))} failed too."
        if lost:
            after += (f"\n\nRank(s) {', '.join(map(str, lost))} then failed because rank {first.rank} "
                      "stopped taking part.")
    if first.message[0] == "missing":
        raise RankError(f"rank {first.rank} {_describe_exit(first.exit_status)} before returning a result "
                        "(sys.exit or os._exit in the worker? a crash? too little memory?)." + after,
                        first.rank)
    _, summary, remote_tb, exc_type = first.message
    message = f"rank {first.rank} failed: {summary}"
    if remote_tb:
        body = remote_tb.rstrip().removeprefix("Traceback (most recent call last):\n")
        message += f"\n\nTraceback of rank {first.rank} (most recent call last):\n{body}"
    raise RankError(message + after, first.rank, remote_tb, exc_type)


# Messages of a collective that failed only because another rank went away.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "pair.cc",
              "communicator was aborted")


def _peer_lost(text: str) -> bool:
    return any(words in text for words in _PEER_LOST)


def _timeout(selector, ranks: list[_Rank], timeout: float, grading: bool) -> None:
    """Ask every unfinished rank where it is, then give up on all of them."""
    unfinished = [r for r in ranks if r.message is None]
    for rank in unfinished:
        try:
            os.kill(rank.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 0.5
    quiet_since = time.monotonic()
    while time.monotonic() < end:
        ready = selector.select(timeout=0.02)
        for key, _ in ready:
            _read(selector, key, grading)
        if ready:
            quiet_since = time.monotonic()
        elif all(r.dump for r in unfinished) and time.monotonic() - quiet_since > 0.05:
            break
    stacks = {r.rank: _format_stack(r.dump) for r in unfinished}
    finished = [r.rank for r in ranks if r.message is not None]
    lines = [f"launch timed out after {timeout:g} s: rank(s) {', '.join(str(r.rank) for r in unfinished)} "
             "had not finished" + (f" (rank(s) {', '.join(map(str, finished))} had)." if finished else ".")]
    lines.append("A deadlock? Every rank must call the same collectives in the same order, and every "
                 "send needs a matching recv on the other rank. All ranks were stopped.")
    for rank, stack in stacks.items():
        lines.append(f"\nRank {rank} was here (most recent call last):\n{stack}")
    lines.append("\nIf the work really takes longer, pass a larger timeout= to launch.")
    raise LaunchTimeout("\n".join(lines), stacks)


def _format_stack(dump: bytes) -> str:
    """faulthandler's dump (most recent call first), reordered, without the launcher's frames."""
    frames = []
    for line in dump.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("File "):
            if os.path.basename(__file__) in line:
                break  # the launcher's own frames, and the notebook's frames above them
            frames.append(line)
    if not frames:
        return "  (no Python stack available)"
    return "\n".join("  " + f for f in reversed(frames))


def _kill(ranks: list[_Rank]) -> None:
    """Kill every rank still alive, with anything it started (its process group), and reap them."""
    for rank in ranks:
        for kill in (os.killpg, os.kill):
            if kill is os.kill and rank.exit_status is not None:
                continue  # reaped: its pid may belong to someone else now
            try:
                kill(rank.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for rank in ranks:
        if rank.exit_status is None:
            try:
                _, rank.exit_status = os.waitpid(rank.pid, 0)
            except ChildProcessError:
                rank.exit_status = 0
            if rank.popen is not None:
                rank.popen.returncode = -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------

def run_under_torchrun(fn: Callable, *args, **kwargs):
    """In a script started by ``torchrun``: join the process group it prepared, run ``fn`` and
    return the list of every rank's result on rank 0 (``None`` on the other ranks).

    The backend is NCCL with GPU ``LOCAL_RANK`` when this node has a GPU per local rank,
    gloo otherwise; ``fn`` is the same worker function you pass to :func:`launch`.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("run_under_torchrun expects the variables torchrun sets (RANK, WORLD_SIZE, ...): "
                           "start the script with `torchrun --nproc-per-node N script.py`.")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    backend, _ = choose_backend(local_world)
    extra = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        extra["device_id"] = torch.device("cuda", local_rank)
    else:
        loopback = _loopback_interface()
        if loopback and int(os.environ["WORLD_SIZE"]) == local_world:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    dist.init_process_group(backend, **extra)
    try:
        result = _to_cpu(fn(*args, **kwargs))
        gathered = [None] * dist.get_world_size()
        if backend == "nccl":
            # Object collectives under NCCL go through the GPU; a CPU (gloo) group avoids it.
            group = dist.new_group(backend="gloo")
            dist.gather_object(result, gathered if dist.get_rank() == 0 else None, dst=0, group=group)
        else:
            dist.gather_object(result, gathered if dist.get_rank() == 0 else None, dst=0)
        return gathered if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def run_with_torchrun(script, nproc_per_node: int = 2, *, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Start ``script`` with ``torchrun --standalone --nproc-per-node N`` and wait for it.

    ``script`` is a ``pathlib.Path`` to a Python file, or the source code as a string (saved in
    a temporary folder first). The course's ``utils`` package is put on the script's import path,
    and each process gets one thread (``OMP_NUM_THREADS=1``). Returns the finished process, with
    its ``returncode``, ``stdout`` and ``stderr`` as text.
    """
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryDirectory(prefix="course-torchrun-") as folder:
        if isinstance(script, Path):
            path = script
        else:
            path = Path(folder) / "script.py"
            path.write_text(script)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(nproc_per_node), str(path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=folder)
