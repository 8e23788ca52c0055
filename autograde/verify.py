"""Verdicts that cannot be switched off from inside the kernel, and feedback made from them.

After nbgrader has graded a submission, its graded exercises are re-checked in a fresh
sandboxed Python process (``verify_harness.py``): the set-up cell, the student's editable
cells and the tests taken from ``solutions/`` (never from the submission), each hidden part in
its own namespace, with tampering detection. A test cell's final score is ``min(nbgrader's,
the verifier's)``, written to the gradebook's ``auto_score`` only; each lowered score is
recorded with its reason. For the tests listed in ``replayable.json`` the verifier also records
what each test exchanged with the student's functions, and the judge (``judge.py``), a process that
runs no student code, replays the test on that record: such a test counts only if both pass it.

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

from autograde import judge, sandbox
from autograde.cells import split_test

HARNESS = (Path(__file__).parent / "verify_harness.py").read_text()


@dataclass
class Verdicts:
    """The verifier's pass/fail per graded cell, with the reason of each failure."""

    passed: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    # Per replayable test cell the verifier passed: the record of its calls, for the judge.
    records: dict[str, str] = field(default_factory=dict)
    # The test cells the judge decided, and those it could not (with why: a person should look).
    judged: list[str] = field(default_factory=list)
    undecided: dict[str, str] = field(default_factory=dict)


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


def _start(graded_nb, source_nb, phase: str, timeout: float, mode: str, notebook: str = ""):
    """Start one sandboxed harness process on the submission (and, in ``verify`` mode, the judge
    of its replayable tests); return what `_finish` needs."""
    setup, cells = job_cells(graded_nb, source_nb, mode)
    tests = {c["id"] for c in cells if c["kind"] == "test"}
    replayed = [gid for gid in judge.replayable(phase, notebook) if gid in tests] if mode == "verify" else []
    nonce = secrets.token_hex(16)
    workdir = sandbox.private_workdir(phase)
    env = dict(os.environ, NBGRADER_EXECUTION="autograde", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    cmd = sandbox.command([sys.executable, "-I", "-c", HARNESS], workdir, env=env)
    try:
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, cwd=workdir, env=env, start_new_session=True)
        process.stdin.write(json.dumps({"nonce": nonce, "timeout": int(timeout), "setup": setup,
                                        "cells": cells, "mode": mode, "record": replayed}).encode())
        process.stdin.close()
        # Started now, so that importing torch and running the set-up cell overlap with the verifier.
        judging = judge.Judge(setup, phase, timeout, judge.EXPLAIN) if replayed else None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    # Per cell index, the test it holds (None for a student cell): the order the stream must follow.
    order = [c["id"] if c["kind"] == "test" else None for c in cells]
    return process, nonce, workdir, order, cells, judging, replayed


def _job_of(started) -> list[dict]:
    return started[4]


def _finish(started, timeout: float) -> Verdicts:
    process, nonce, workdir, order, cells, judging, replayed = started
    verdicts = Verdicts()
    tests = {c["id"]: c for c in cells if c["kind"] == "test"}
    sent = []

    def passed(gid):
        """A replayable test the verifier passed goes to the judge at once, with its record."""
        if judging is not None and gid in replayed and verdicts.records.get(gid):
            judging.send({"id": gid, "visible": tests[gid]["visible"], "hidden": tests[gid]["hidden"],
                          "record": verdicts.records[gid]})
            sent.append(gid)

    try:
        _collect(process, nonce, timeout, verdicts, order, passed)
    except BaseException:
        if judging is not None:
            judging.close()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for gid in (g for g in order if g is not None):
        if gid not in verdicts.passed:
            verdicts.passed[gid] = False
            verdicts.reasons[gid] = "the re-run did not reach this test (the submission hung or crashed)"
    if judging is not None:
        _judge(judging, verdicts, replayed, sent)
    return verdicts


def _judge(judging, verdicts: Verdicts, replayed: list[str], sent: list[str]) -> None:
    """A replayable test the verifier passed counts only if the judge, which runs no student code,
    passes it too on the recorded calls."""
    for gid in replayed:
        if not verdicts.passed.get(gid) or gid in sent:
            continue
        if gid not in verdicts.records:
            verdicts.passed[gid] = False
            verdicts.reasons[gid] = "the judge: the verifier sent no record of this test's calls"
        elif not verdicts.records[gid]:
            verdicts.undecided[gid] = "the judge could not replay this test: its record of calls is too large"
    if not sent:
        judging.close()
        return
    for gid, (passed, reason) in judging.decide(sent).items():
        if passed is None:
            verdicts.undecided[gid] = reason
            continue
        verdicts.judged.append(gid)
        if not passed:
            verdicts.passed[gid] = False
            verdicts.reasons[gid] = reason


def run(graded_nb, source_nb, phase: str, timeout: float, mode: str = "verify", notebook: str = "") -> Verdicts:
    """Re-run the submission's graded cells in a fresh sandboxed process; return the verdicts
    (``mode="visible"``: the visible tests only, with their failure messages as reasons)."""
    return _finish(_start(graded_nb, source_nb, phase, timeout, mode, notebook), timeout)


def run_both(graded_nb, source_nb, phase: str, timeout: float, expect_failures: bool = True, notebook: str = ""
             ) -> tuple[Verdicts, Verdicts]:
    """The verifier's verdicts and the visible tests' messages. When failures are expected (nbgrader
    failed a test) the two processes run side by side; otherwise the visible run is needed only if
    the verifier fails a test, and is skipped when it does not."""
    verify = _start(graded_nb, source_nb, phase, timeout, "verify", notebook)
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

# The longest line the harness writes (a test's record of calls: 14 MB for the largest reference).
MAX_LINE_BYTES = 256 << 20
# A verdict stream that breaks the harness's order voids every verdict of the run.
OUT_OF_ORDER = "the verdict stream broke the harness's order (a line written by something else)"


def _collect(process, nonce: str, timeout: float, verdicts: Verdicts, order: list, passed=None) -> None:
    """Read the harness's verdict lines; kill it when one cell runs far past the limit
    (a loop that swallows the interrupt).

    The harness announces every cell by its index, in order, and reports a test right after its
    own cell's announcement, once. A line that breaks that order can only come from student code
    that learned the nonce: then no verdict of the run counts, since a forger who writes first
    would otherwise keep the verdicts it wrote before the harness's own lines exposed it.
    ``passed(gid)`` is called for each test reported passed, as it arrives."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout + 15  # set-up cell included
    # Counted from here: until now the harness ran beside nbgrader, itself bounded.
    last_call = time.monotonic() + WHOLE_RUN_SECONDS
    pieces, pending = [], 0
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
            if b"\n" not in chunk:  # a long line (a record of calls): no quadratic re-splitting
                pieces.append(chunk)
                pending += len(chunk)
                if pending > MAX_LINE_BYTES:  # a flood, not the harness
                    void()
                    return
                continue
            pending = 0
            buffer = b"".join(pieces) + chunk
            *lines, last = buffer.split(b"\n")
            pieces = [last]
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
                    elif kind == "record":
                        gid, text = rest
                        if reported or current < 0 or gid != order[current] or gid in verdicts.records \
                                or not isinstance(text, str):
                            raise ValueError
                        verdicts.records[gid] = text
                    elif kind == "test":
                        gid, outcome, reason = rest
                        if reported or current < 0 or gid != order[current] or outcome not in ("pass", "fail"):
                            raise ValueError
                        reported = True
                        verdicts.passed[gid] = outcome == "pass"
                        if reason:
                            verdicts.reasons[gid] = str(reason)
                        if outcome == "pass" and passed is not None:
                            passed(gid)
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


def start(submitted_nb, source_nb, phase: str, timeout: float, notebook: str = ""):
    """Start the verifier on a submission before nbgrader grades it (the two then run side by side;
    the job is made of the submission's own cells, the same as in nbgrader's graded copy, and
    the tests from ``source_nb``). Pass the result to ``apply(..., started=...)``, or to ``cancel``."""
    return _start(submitted_nb, source_nb, phase, timeout, "verify", notebook)


def cancel(started) -> None:
    """Stop a verifier started with ``start`` whose verdicts are not needed (nbgrader failed)."""
    process, _, workdir, _, _, judging, _ = started
    if process.poll() is None:
        process.kill()
    process.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    if judging is not None:
        judging.close()


def apply(gradebook, graded_path: Path, source_nb, phase: str, notebook: str, student: str,
          timeout: float, started=None) -> tuple[list[dict], dict, dict]:
    """Verify one autograded notebook; lower the gradebook's auto scores the verifier does not
    confirm (manual scores untouched) and mark those cells failed in the autograded notebook.
    ``started``: the verifier already running on this submission (``start``), else one is run now.
    Returns the overrides, per test cell what the feedback may say (``{"passed": bool, "message":
    str}``: the visible test's message, or a fixed line), and the judge's part: ``{"judged": [test
    cells it decided], "flags": [tests it could not decide, for a person]}``."""
    graded_nb = nbformat.read(graded_path, as_version=4)
    grades = {_meta(c)["grade_id"]: gradebook.find_grade(_meta(c)["grade_id"], notebook, phase, student)
              for c in graded_nb.cells if _meta(c).get("grade") and c.cell_type == "code"}
    failed_by_nbgrader = any(g.auto_score is None or g.auto_score < g.max_score for g in grades.values())
    if started is not None and _job_of(started) != job_cells(graded_nb, source_nb)[1]:
        cancel(started)  # nbgrader's copy differs (a deleted test cell it put back): verify that copy
        started = None
    if started is None:
        verdicts, visible = run_both(graded_nb, source_nb, phase, timeout, expect_failures=failed_by_nbgrader,
                                     notebook=notebook)
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
    judged = {"judged": list(verdicts.judged),
              "flags": [f"{notebook}: {gid}: {reason}" for gid, reason in verdicts.undecided.items()]}
    return overrides, feedback, judged
