"""Verdicts that cannot be switched off from inside the kernel, and feedback made from them.

After nbgrader has graded a submission, its graded exercises are re-checked in a fresh
sandboxed Python process (``verify_harness.py``): the set-up cell, the student's editable
cells and the tests taken from ``solutions/`` (never from the submission), each hidden part in
its own namespace, with tampering detection. A test cell's final score is ``min(nbgrader's,
the verifier's)``, written to the gradebook's ``auto_score`` only; each lowered score is
recorded with its reason.

At the same time a second sandboxed process runs what the student's Validate button runs: the
student's cells and the released (visible) tests, no hidden test in sight. Its failure messages
are the only text of grading that reaches the student: the feedback (``feedback.py``) shows, per
test cell, a fixed pass/fail line and that message, never output produced while hidden tests ran.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat.v4 import new_output

from autograde import sandbox
from autograde.cells import split_test

HARNESS = (Path(__file__).parent / "verify_harness.py").read_text()


@dataclass
class Verdicts:
    """The verifier's pass/fail per graded cell, with the reason of each failure."""

    passed: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


# What the feedback says of a failed test whose visible part passed (no student text in it).
HIDDEN_FAILED = ("The visible test passes, but the hidden tests found a case your code gets wrong: "
                 "check other shapes, seeds and edge cases, and what the statement says may be used.")
NOT_CONFIRMED = "This test did not pass when your notebook was re-run in a clean process."
# The verifier's reasons for a test that ran and failed (the others are tampering, crashes, hangs).
GENUINE_FAILURES = ("a check failed", "the test raised", "the cell ran longer")


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def job_cells(graded_nb, source_nb, mode: str = "verify") -> tuple[str, list[dict]]:
    """The set-up source and the cells to run: the student's editable code cells and the test
    cells (from the source notebook, split into their visible and hidden parts; in ``visible``
    mode the hidden parts are left out), in the order of the graded notebook."""
    sources = {_meta(c)["grade_id"]: c.source for c in source_nb.cells if "grade_id" in _meta(c)}
    cells = []
    for cell in graded_nb.cells:
        if cell.cell_type != "code":
            continue
        meta = _meta(cell)
        if meta.get("grade") and meta.get("grade_id") in sources:
            visible, hidden = split_test(sources[meta["grade_id"]])
            cells.append({"kind": "test", "id": meta["grade_id"], "visible": visible,
                          "hidden": hidden if mode == "verify" else ""})
        elif meta.get("solution") or not meta:  # solution cells and cells the student added
            cells.append({"kind": "student", "id": meta.get("grade_id", ""), "source": cell.source})
    return sources.get("setup", ""), cells


def _start(graded_nb, source_nb, phase: str, timeout: float, mode: str):
    """Start one sandboxed harness process on the submission; return what `_finish` needs."""
    setup, cells = job_cells(graded_nb, source_nb, mode)
    nonce = secrets.token_hex(16)
    workdir = sandbox.private_workdir(phase)
    env = dict(os.environ, NBGRADER_EXECUTION="autograde", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    cmd = sandbox.command([sys.executable, "-I", "-c", HARNESS], workdir, env=env)
    try:
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, cwd=workdir, env=env, start_new_session=True)
        process.stdin.write(json.dumps({"nonce": nonce, "timeout": int(timeout), "setup": setup,
                                        "cells": cells, "mode": mode}).encode())
        process.stdin.close()
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    # Per cell index, the test it holds (None for a student cell): the order the stream must follow.
    order = [c["id"] if c["kind"] == "test" else None for c in cells]
    return process, nonce, workdir, order, cells


def _job_of(started) -> list[dict]:
    return started[4]


def _finish(started, timeout: float) -> Verdicts:
    process, nonce, workdir, order, _ = started
    verdicts = Verdicts()
    try:
        _collect(process, nonce, timeout, verdicts, order)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for gid in (g for g in order if g is not None):
        if gid not in verdicts.passed:
            verdicts.passed[gid] = False
            verdicts.reasons[gid] = "the re-run did not reach this test (the submission hung or crashed)"
    return verdicts


def run(graded_nb, source_nb, phase: str, timeout: float, mode: str = "verify") -> Verdicts:
    """Re-run the submission's graded cells in a fresh sandboxed process; return the verdicts
    (``mode="visible"``: the visible tests only, with their failure messages as reasons)."""
    return _finish(_start(graded_nb, source_nb, phase, timeout, mode), timeout)


def run_both(graded_nb, source_nb, phase: str, timeout: float, expect_failures: bool = True
             ) -> tuple[Verdicts, Verdicts]:
    """The verifier's verdicts and the visible tests' messages. When failures are expected (nbgrader
    failed a test) the two processes run side by side; otherwise the visible run is needed only if
    the verifier fails a test, and is skipped when it does not."""
    verify = _start(graded_nb, source_nb, phase, timeout, "verify")
    if not expect_failures:
        verdicts = _finish(verify, timeout)
        if all(verdicts.passed.values()):
            return verdicts, Verdicts(passed=dict(verdicts.passed))
        return verdicts, run(graded_nb, source_nb, phase, timeout, "visible")
    try:
        visible = _start(graded_nb, source_nb, phase, timeout, "visible")
    except BaseException:
        _finish(verify, timeout)
        raise
    return _finish(verify, timeout), _finish(visible, timeout)


# Seconds one harness process may run in all, whatever its cells do (each cell also has its own
# deadline): like nbgrader's `--submission-timeout`, the bound that keeps a batch from stalling.
WHOLE_RUN_SECONDS = 1200

# A verdict stream that breaks the harness's order voids every verdict of the run.
OUT_OF_ORDER = "the verdict stream broke the harness's order (a line written by something else)"


def _collect(process, nonce: str, timeout: float, verdicts: Verdicts, order: list) -> None:
    """Read the harness's verdict lines; kill it when one cell runs far past the limit
    (a loop that swallows the interrupt).

    The harness announces every cell by its index, in order, and reports a test right after its
    own cell's announcement, once. A line that breaks that order can only come from student code
    that learned the nonce: then no verdict of the run counts, since a forger who writes first
    would otherwise keep the verdicts it wrote before the harness's own lines exposed it."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout + 15  # set-up cell included
    # Counted from here: until now the harness ran beside nbgrader, itself bounded.
    last_call = time.monotonic() + WHOLE_RUN_SECONDS
    buffer = b""
    current, reported = -1, False

    def void():
        for gid in order:
            if gid is not None:
                verdicts.passed[gid] = False
                verdicts.reasons[gid] = OUT_OF_ORDER

    try:
        while True:
            left = min(deadline, last_call) - time.monotonic()
            if left <= 0 or not selector.select(timeout=left):
                return
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                prefix, _, payload = line.decode(errors="replace").partition(" ")
                if prefix != nonce:
                    continue  # not the harness: ignore
                try:
                    kind, *rest = json.loads(payload)
                    if kind == "cell":
                        if rest != [current + 1] or current + 1 >= len(order):
                            raise ValueError
                        current, reported = current + 1, False
                        deadline = time.monotonic() + timeout + 10
                    elif kind == "test":
                        gid, outcome, reason = rest
                        if reported or current < 0 or gid != order[current] or outcome not in ("pass", "fail"):
                            raise ValueError
                        reported = True
                        verdicts.passed[gid] = outcome == "pass"
                        if reason:
                            verdicts.reasons[gid] = str(reason)
                    elif kind == "setup-failed":
                        verdicts.reasons["setup"] = str(rest[0])
                    elif kind == "done":
                        if current != len(order) - 1 or (order and order[-1] is not None and not reported):
                            raise ValueError
                        return
                    else:
                        raise ValueError
                except (ValueError, TypeError):
                    void()
                    return
    finally:
        selector.close()
        if process.poll() is None:
            process.kill()
        process.wait()


def start(submitted_nb, source_nb, phase: str, timeout: float):
    """Start the verifier on a submission before nbgrader grades it (the two then run side by side;
    the job is made of the submission's own cells, the same as in nbgrader's graded copy, and
    the tests from ``source_nb``). Pass the result to ``apply(..., started=...)``, or to ``cancel``."""
    return _start(submitted_nb, source_nb, phase, timeout, "verify")


def cancel(started) -> None:
    """Stop a verifier started with ``start`` whose verdicts are not needed (nbgrader failed)."""
    process, _, workdir, *_ = started
    if process.poll() is None:
        process.kill()
    process.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def apply(gradebook, graded_path: Path, source_nb, phase: str, notebook: str, student: str,
          timeout: float, started=None) -> tuple[list[dict], dict]:
    """Verify one autograded notebook; lower the gradebook's auto scores the verifier does not
    confirm (manual scores untouched) and mark those cells failed in the autograded notebook.
    ``started``: the verifier already running on this submission (``start``), else one is run now.
    Returns the overrides, and per test cell what the feedback may say: ``{"passed": bool,
    "message": str}`` (the visible test's message, or a fixed line)."""
    graded_nb = nbformat.read(graded_path, as_version=4)
    grades = {_meta(c)["grade_id"]: gradebook.find_grade(_meta(c)["grade_id"], notebook, phase, student)
              for c in graded_nb.cells if _meta(c).get("grade") and c.cell_type == "code"}
    failed_by_nbgrader = any(g.auto_score is None or g.auto_score < g.max_score for g in grades.values())
    if started is not None and _job_of(started) != job_cells(graded_nb, source_nb)[1]:
        cancel(started)  # nbgrader's copy differs (a deleted test cell it put back): verify that copy
        started = None
    if started is None:
        verdicts, visible = run_both(graded_nb, source_nb, phase, timeout, expect_failures=failed_by_nbgrader)
    else:
        verdicts = _finish(started, timeout)
        if failed_by_nbgrader or not all(verdicts.passed.values()):
            visible = run(graded_nb, source_nb, phase, timeout, "visible")
        else:
            visible = Verdicts(passed=dict(verdicts.passed))
    overrides = []
    feedback = {}
    for cell in graded_nb.cells:
        gid = _meta(cell).get("grade_id")
        if gid not in verdicts.passed:
            continue
        grade = grades[gid]
        if verdicts.passed[gid] and grade.auto_score is not None and grade.auto_score >= grade.max_score:
            feedback[gid] = {"passed": True, "message": ""}
        elif visible.passed.get(gid) is False and visible.reasons.get(gid):
            feedback[gid] = {"passed": False, "message": visible.reasons[gid]}
        elif verdicts.passed[gid] or verdicts.reasons.get(gid, "").startswith(GENUINE_FAILURES):
            feedback[gid] = {"passed": False, "message": HIDDEN_FAILED}
        else:  # tampering, a crash or a hang: the verifier's own words stay in the instructor's record
            feedback[gid] = {"passed": False, "message": NOT_CONFIRMED}
        if verdicts.passed[gid]:
            continue
        if grade.auto_score:
            reason = verdicts.reasons.get(gid, "failed")
            overrides.append({"cell": gid, "nbgrader": grade.auto_score, "final": 0.0, "reason": reason})
            grade.auto_score = 0.0
            cell.outputs = [new_output("error", ename="NotConfirmed", traceback=[],
                                       evalue=f"this test did not pass when re-run in a clean process ({reason})")]
    if overrides:
        gradebook.db.commit()
        os.chmod(graded_path, 0o644)
        nbformat.write(graded_nb, graded_path)
        os.chmod(graded_path, 0o444)
    return overrides, feedback
