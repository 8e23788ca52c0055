"""Run students' code where it can harm nothing: bubblewrap, an unprivileged uid and rlimits.

Three protection levels, the strongest available is chosen once per process
(see README, "For instructors"):

``bubblewrap``
    read-only root, private /tmp, the course repository, the helpers' source tree and
    the home directory hidden (only the interpreter and the ``utils`` package shown
    again, read-only), no network (own net, pid, ipc, uts namespaces), a fresh
    writable working directory, then an unprivileged uid and rlimits.
``unprivileged``
    no bubblewrap, but the grader is root: a fresh working directory, an unprivileged
    uid (so file permissions protect what is not world-readable) and rlimits.
``rlimits``
    only a fresh working directory and rlimits: the code runs with the grader's rights.

The kernel runs in its own network namespace and cannot reach the grader's loopback
TCP ports, so :class:`SandboxedKernelManager` talks to it over unix sockets (ZeroMQ
``ipc``) in a short private directory bind-mounted into the sandbox.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from traitlets import Float, Int

from autograde import layout

BWRAP = shutil.which("bwrap")
LEVELS = ("bubblewrap", "unprivileged", "rlimits")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Environment variables passed into the sandbox; everything else (tokens, keys) stays out.
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "NBGRADER_EXECUTION", "NBGRADER_VALIDATING",
            "PYTHONWARNINGS", "TQDM_DISABLE", "JPY_SESSION_NAME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# Runs inside the sandbox, before the student's interpreter: set the rlimits, leave root.
# A string run with `python -I -S -c`, so that it needs nothing from the course on the path.
_DROP = """
import os, resource, sys
uid, as_, cpu, fsize, nofile, nproc = map(int, sys.argv[1:7])
for which, value in ((resource.RLIMIT_AS, as_), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_NPROC, nproc)):
    if value > 0:
        resource.setrlimit(which, (value, value))
if uid > 0 and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
os.execvp(sys.argv[8], sys.argv[8:])
"""


@dataclass(frozen=True)
class Limits:
    """Per-process limits of sandboxed code (0 means none)."""

    memory_bytes: int = 8 * 2**30
    cpu_seconds: int = 1800
    file_bytes: int = 256 * 2**20
    open_files: int = 1024
    # Threads count too: torch and ipykernel start a few dozen.
    processes: int = 256

    @classmethod
    def from_env(cls) -> "Limits":
        """The limits the instructor chose (`autograde --memory-gb`), passed down through the environment."""
        gb = os.environ.get("AUTOGRADE_MEMORY_GB")
        return cls(memory_bytes=int(float(gb) * 2**30)) if gb else cls()


def new_uid() -> int:
    """A fresh unprivileged uid for one sandboxed process tree. The process limit counts every
    process of a uid, so each kernel and each verifier gets its own: one student's fork bomb
    cannot use up another's limit (nor their own verifier's), and `kill_user` stops exactly one tree."""
    return 200_000 + secrets.randbelow(50_000)


def kill_user(uid: int) -> int:
    """SIGKILL every process running as ``uid`` (a sandbox uid: nothing else runs as it); return
    how many. What a submission left behind (a fork bomb's sleepers, a kernel whose grader was
    stopped) cannot outlive its grading. Reads /proc/<pid>/status, since a process that made
    itself undumpable shows /proc/<pid> as root's."""
    if uid <= 0 or not Path("/proc").is_dir():
        return 0
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            real = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            if int(real) == uid:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, StopIteration, ValueError):
            pass  # gone already
    return killed


def _hidden_trees() -> list[Path]:
    """Folders the student's code must not see: the home directory, the course repository
    (solutions, gradebook, other students, git history) and the helpers' source checkout."""
    trees = {Path.home().resolve(), layout.ROOT.resolve()}
    helpers = _helper_package()
    if helpers:
        trees.add(helpers.parent)
    return sorted(t for t in trees if t != Path("/"))


def _helper_package() -> Path | None:
    spec = find_spec("utils")
    return Path(spec.origin).resolve().parent if spec and spec.origin else None


def _shown_again() -> list[Path]:
    """What student code needs from inside a hidden tree: the interpreter and the helpers, read-only."""
    needed = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    helpers = _helper_package()
    if helpers:
        needed.add(helpers)
    hidden = _hidden_trees()
    return sorted(p for p in needed if any(p.is_relative_to(h) for h in hidden))


def _bwrap_args(workdir: Path, writable: list[Path], env: dict) -> list[str]:
    args = [BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--tmpfs", "/tmp",
            # Not --unshare-all: a user namespace would keep us root outside, where the
            # process limit does not apply to root. bwrap runs as root and we leave root after.
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv"]
    for tree in _hidden_trees():
        args += ["--tmpfs", str(tree)]
    for path in _shown_again():
        # bwrap would create the folders on the way with mode 0700, closed to the unprivileged uid.
        hidden = next(h for h in _hidden_trees() if path.is_relative_to(h))
        for folder in reversed(path.parents):
            if folder.is_relative_to(hidden) and folder != hidden:
                args += ["--perms", "0755", "--dir", str(folder)]
        args += ["--ro-bind", str(path), str(path)]
    for path in [workdir, *writable]:
        args += ["--bind", str(path), str(path)]
    for name in KEPT_ENV:
        if name in env:
            args += ["--setenv", name, env[name]]
    args += ["--setenv", "HOME", str(workdir), "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
             "--chdir", str(workdir)]
    return args


def _drop_args(limits: Limits, uid: int) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _DROP, str(uid), str(limits.memory_bytes),
            str(limits.cpu_seconds), str(limits.file_bytes), str(limits.open_files),
            str(limits.processes), "--"]


@functools.lru_cache(maxsize=None)
def level() -> str:
    """The strongest protection level that works here, probed once by running a trivial sandbox
    (the batch probes and passes its answer to the nbgrader processes it starts)."""
    if os.environ.get("AUTOGRADE_SANDBOX") in LEVELS:
        return os.environ["AUTOGRADE_SANDBOX"]
    probe = tempfile.mkdtemp(prefix="agprobe-")
    try:
        for candidate in ("bubblewrap", "unprivileged"):
            if candidate == "bubblewrap" and not BWRAP:
                continue
            if candidate == "unprivileged" and not IS_ROOT:
                continue
            cmd = command([sys.executable, "-c", "import torch"], Path(probe), level_=candidate)
            try:
                if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                    return candidate
            except (OSError, subprocess.TimeoutExpired):
                pass
        return "rlimits"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def warning() -> str | None:
    """What the instructor must know when the strongest level is not available."""
    return {
        "bubblewrap": None,
        "unprivileged": "bubblewrap is missing or does not start: student code runs as an unprivileged "
                        "user without namespaces; it can read world-readable files and use the network.",
        "rlimits": "no sandbox: student code runs with the grader's rights (only rlimits and a private "
                   "working directory). Install bubblewrap (apt-get install bubblewrap).",
    }[level()]


def command(argv: list[str], workdir: Path, writable: list[Path] = (), limits: Limits | None = None,
            level_: str | None = None, env: dict | None = None, uid: int | None = None) -> list[str]:
    """``argv`` wrapped to run sandboxed in ``workdir`` (which the sandbox may write, as may ``writable``),
    with the variables of ``env`` (default: this process's) that :data:`KEPT_ENV` names, as ``uid``
    (default: a new one; ignored where the grader is not root or at the ``rlimits`` level)."""
    limits = limits or Limits.from_env()
    chosen = level_ or level()
    uid = (uid or new_uid()) if IS_ROOT and chosen != "rlimits" else 0
    for path in [workdir, *writable]:
        if uid:
            os.chown(path, uid, uid)
    prefix = _bwrap_args(workdir, list(writable), os.environ if env is None else env) + ["--"] \
        if chosen == "bubblewrap" else []
    return prefix + _drop_args(limits, uid) + list(argv)


def private_workdir(phase: str | None) -> Path:
    """A fresh writable folder holding copies of the released phase's files, nothing else:
    never the autograded notebook (hidden tests restored) or a student's extra files."""
    workdir = Path(tempfile.mkdtemp(prefix="agw-"))
    release = layout.RELEASE / phase if phase else None
    if release and release.is_dir():
        shutil.copytree(release, workdir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    os.chmod(workdir, 0o755)
    return workdir


class SandboxedKernelManager(AsyncKernelManager):
    """The kernel nbgrader grades in, sandboxed (``c.Execute.kernel_manager_class``)."""

    memory_gb = Float(0.0, config=True, help="address-space limit of the kernel (0: AUTOGRADE_MEMORY_GB or 8)")
    cpu_seconds = Int(1800, config=True, help="CPU seconds the kernel may use in all")

    async def _async_pre_start_kernel(self, **kw):
        # Unix sockets in a short private folder (a socket path must stay under 107 characters).
        self._private = Path(tempfile.mkdtemp(prefix="agk-", dir="/tmp"))
        os.chmod(self._private, 0o700)
        self.transport = "ipc"
        self.ip = str(self._private / "k")
        self.connection_file = str(self._private / "kernel.json")
        # nbgrader starts the kernel in autograded/<student>/<phase>/: take only the phase's name.
        phase = Path(kw["cwd"]).name if kw.get("cwd") else None
        self._workdir = private_workdir(phase)
        kw["cwd"] = str(self._workdir)
        # A signal to bwrap does not reach the kernel inside (own session and pid namespace):
        # interrupt a cell that runs too long with a message on the control channel instead.
        self.kernel_spec.interrupt_mode = "message"
        cmd, kw = await super()._async_pre_start_kernel(**kw)
        os.chmod(self.connection_file, 0o644)
        limits = Limits.from_env()
        if self.memory_gb:
            limits = Limits(memory_bytes=int(self.memory_gb * 2**30), cpu_seconds=self.cpu_seconds)
        if warning():
            self.log.warning("autograde sandbox: %s", warning())
        # The batch chose this kernel's uid (AUTOGRADE_UID), so that it can stop whatever the
        # submission left running once grading ends or runs out of time.
        uid = int(os.environ.get("AUTOGRADE_UID") or 0) or None
        return command(cmd, self._workdir, [self._private], limits, env=kw.get("env"), uid=uid), kw

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        if not restart:
            for path in (getattr(self, "_private", None), getattr(self, "_workdir", None)):
                if path:
                    shutil.rmtree(path, ignore_errors=True)
