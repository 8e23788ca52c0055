"""The judge: a process that never runs student code decides the tests whose calls can be replayed.

The verifier (``verify_harness.py``) runs the student's code and the tests in one process, where a
submission that rewrites memory through a raw pointer can make any check say yes (README, "A judge
that runs no student code"). So for every listed test cell it passes, it also records what the test
exchanged with the student's functions, as plain data (``utils/replay.py``, ``utils/transcript.py``).
The judge (``judge_harness.py``) runs the instructor's set-up cell and the test again, in a process
of its own, with the student's functions replayed from that record: the test's references and
checks run on the judge's side, against exact tensors and built-in values. Such a cell counts only
if the judge passes it too; one it cannot decide (the student's code handed it something that is
not data) keeps the verifier's verdict and is flagged for a person.

Objects of the student's classes cross by handle and are stood in for in the judge
(``utils/handles.py``); ranks a test launches record and replay their own calls
(``utils/distributed.py``). Which test cells are replayed is listed in ``replayable.json``,
measured on the reference solutions (``python -m autograde.judge --write`` rewrites the list; the
per-phase grading test requires the reference to be judged on each). A cell that checks *how*
inside the test (hooks, communication logs, dispatch modes), reads files or runs student code
outside the calls it makes is decided in the verifier's process only.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

from autograde import sandbox

HARNESS = (Path(__file__).parent / "judge_harness.py").read_text()
REPLAYABLE = Path(__file__).parent / "replayable.json"
# Set only by `survey`: the judge then says why a reference test failed (never while grading).
EXPLAIN = False


def replayable(phase: str, notebook: str) -> list[str]:
    """The test cells of ``phase``'s ``notebook`` (a file name, with or without .ipynb) the judge decides."""
    listed = json.loads(REPLAYABLE.read_text()) if REPLAYABLE.exists() else {}
    return listed.get(f"{phase}/{notebook.removesuffix('.ipynb')}", [])


class Judge:
    """A judge process, started with the set-up cell before the verifier's records exist."""

    def __init__(self, setup: str, phase: str, timeout: float, explain: bool = False):
        self.timeout = timeout
        self.workdir = sandbox.private_workdir(phase)
        env = dict(os.environ, NBGRADER_EXECUTION="autograde", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        cmd = sandbox.command([sys.executable, "-I", "-c", HARNESS], self.workdir, env=env)
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, cwd=self.workdir, env=env,
                                        start_new_session=True)
        self._send({"setup": setup, "timeout": int(timeout), "explain": explain})

    def _send(self, message: dict) -> None:
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()

    def send(self, cell: dict) -> None:
        """Hand the judge one test cell (``{"id", "visible", "hidden", "record"}``) as soon as the
        verifier has passed it: the judge works while the verifier goes on."""
        try:
            self._send(cell)
        except (BrokenPipeError, OSError):
            pass  # a judge that died reports nothing: `decide` fails those cells

    def decide(self, ids: list[str]) -> dict[str, tuple[bool | None, str]]:
        """Per test cell sent: (passed, reason), where passed is None when the judge could not decide
        (the student's code handed it something that is not plain data: a person should look). A
        cell the judge did not report (it crashed, or ran past its time) has failed."""
        verdicts = {}
        try:
            self._send({"done": True})
            self.process.stdin.close()
            # Each cell has its own alarm inside the judge; this bounds a judge that is stuck anyway.
            deadline = time.monotonic() + min(1200, 60 + self.timeout * max(1, len(ids)))
            for kind, *rest in _lines(self.process, deadline):
                if kind == "test" and len(rest) == 3 and rest[0] in ids:
                    gid, outcome, reason = rest
                    verdicts[gid] = ({"pass": True, "undecided": None}.get(outcome, False), str(reason))
                elif kind in ("done", "setup-failed"):
                    break
        except (BrokenPipeError, OSError):
            pass
        finally:
            self.close()
        for gid in ids:
            verdicts.setdefault(gid, (False, "the judge did not report this test (it crashed or hung)"))
        return verdicts

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _lines(process, deadline: float):
    """The judge's JSON lines until it ends or the deadline passes."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(timeout=left):
                return
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, list) and message and isinstance(message[0], str):
                    yield message
    finally:
        selector.close()


def survey(phases: list[str], timeout: float = 300) -> dict[str, list[str]]:
    """Grade each phase's reference solution with every test cell replayed; print each cell's
    verdict and return, per notebook, the cells the judge passed (what ``replayable.json`` lists)."""
    import nbformat

    from autograde import judge, layout, verify  # this module by name, also when run as __main__

    listed = {}
    for phase in phases:
        for path in sorted((layout.SOURCE / phase).glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            tests = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if c.cell_type == "code"
                     and c.metadata.get("nbgrader", {}).get("grade")]
            saved, judge.replayable = judge.replayable, lambda *_: tests
            judge.EXPLAIN = True
            try:
                started = time.monotonic()
                verdicts = verify.run(nb, nb, phase, timeout, notebook=path.stem)
            finally:
                judge.replayable, judge.EXPLAIN = saved, False
            key = f"{phase}/{path.stem}"
            listed[key] = [gid for gid in tests if verdicts.passed.get(gid) and gid in verdicts.judged]
            print(f"{key}: {len(listed[key])} of {len(tests)} test cells replayed "
                  f"({time.monotonic() - started:.1f} s)")
            for gid in tests:
                size = len(verdicts.records.get(gid, ""))
                print(f"  {gid:40} {'judged' if gid in listed[key] else 'in-process only':16} "
                      f"{size / 1e3:8.1f} kB  {verdicts.reasons.get(gid) or verdicts.undecided.get(gid, '')}")
    return listed


if __name__ == "__main__":
    import argparse

    from autograde import layout

    parser = argparse.ArgumentParser(description="Find the test cells the judge can decide (on the reference solutions).")
    parser.add_argument("phases", nargs="*", help="phases to survey (default: all)")
    parser.add_argument("--write", action="store_true", help=f"write the list to {REPLAYABLE.name}")
    args = parser.parse_args()
    found = survey(args.phases or layout.available_phases())
    if args.write:
        listed = json.loads(REPLAYABLE.read_text()) if REPLAYABLE.exists() else {}
        listed.update(found)
        REPLAYABLE.write_text(json.dumps(dict(sorted(listed.items())), indent=1) + "\n")
