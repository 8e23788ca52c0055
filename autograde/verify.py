"""Verdicts that cannot be switched off from inside the kernel.

After nbgrader has graded a submission, its graded exercises are re-checked in a fresh
sandboxed Python process (``verify_harness.py``): the set-up cell, the student's editable
cells and the hidden tests taken from ``solutions/`` (never from the submission), with
tampering detection. A test cell's final score is ``min(nbgrader's, the verifier's)``,
written to the gradebook's ``auto_score`` only; each lowered score is recorded with its
reason and shows in the feedback as a failed test.
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

HARNESS = (Path(__file__).parent / "verify_harness.py").read_text()


@dataclass
class Verdicts:
    """The verifier's pass/fail per graded cell, with the reason of each failure."""

    passed: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def job_cells(graded_nb, source_nb) -> tuple[str, list[dict]]:
    """The set-up source and the cells to run: the student's editable code cells and the hidden
    tests (from the source notebook), in the order of the graded notebook."""
    sources = {_meta(c)["grade_id"]: c.source for c in source_nb.cells if "grade_id" in _meta(c)}
    cells = []
    for cell in graded_nb.cells:
        if cell.cell_type != "code":
            continue
        meta = _meta(cell)
        if meta.get("grade") and meta.get("grade_id") in sources:
            cells.append({"kind": "test", "id": meta["grade_id"], "source": sources[meta["grade_id"]]})
        elif meta.get("solution") or not meta:  # solution cells and cells the student added
            cells.append({"kind": "student", "id": meta.get("grade_id", ""), "source": cell.source})
    return sources.get("setup", ""), cells


def run(graded_nb, source_nb, phase: str, timeout: float) -> Verdicts:
    """Re-run the submission's graded cells in a fresh sandboxed process; return the verdicts."""
    setup, cells = job_cells(graded_nb, source_nb)
    tests = [c["id"] for c in cells if c["kind"] == "test"]
    verdicts = Verdicts()
    nonce = secrets.token_hex(16)
    workdir = sandbox.private_workdir(phase)
    env = dict(os.environ, NBGRADER_EXECUTION="autograde", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    cmd = sandbox.command([sys.executable, "-I", "-c", HARNESS], workdir, env=env)
    try:
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, cwd=workdir, env=env, start_new_session=True)
        process.stdin.write(json.dumps({"nonce": nonce, "timeout": int(timeout), "setup": setup,
                                        "cells": cells}).encode())
        process.stdin.close()
        _collect(process, nonce, timeout, verdicts)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for gid in tests:
        if gid not in verdicts.passed:
            verdicts.passed[gid] = False
            verdicts.reasons[gid] = "the re-run did not reach this test (the submission hung or crashed)"
    return verdicts


def _collect(process, nonce: str, timeout: float, verdicts: Verdicts) -> None:
    """Read the harness's verdict lines; kill it when one cell runs far past the limit
    (a loop that swallows the interrupt)."""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout + 15  # set-up cell included
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
                prefix, _, payload = line.decode(errors="replace").partition(" ")
                if prefix != nonce:
                    continue  # not the harness: ignore
                kind, *rest = json.loads(payload)
                if kind == "cell":
                    deadline = time.monotonic() + timeout + 10
                elif kind == "test":
                    gid, outcome, reason = rest
                    verdicts.passed[gid] = outcome == "pass"
                    if reason:
                        verdicts.reasons[gid] = reason
                elif kind == "setup-failed":
                    verdicts.reasons["setup"] = rest[0]
                elif kind == "done":
                    return
    finally:
        selector.close()
        if process.poll() is None:
            process.kill()
        process.wait()


def apply(gradebook, graded_path: Path, source_nb, phase: str, notebook: str, student: str,
          timeout: float) -> list[dict]:
    """Verify one autograded notebook; lower the gradebook's auto scores the verifier does not
    confirm (manual scores untouched) and mark those cells failed in the autograded notebook,
    which feedback is made from. Returns the overrides."""
    graded_nb = nbformat.read(graded_path, as_version=4)
    verdicts = run(graded_nb, source_nb, phase, timeout)
    overrides = []
    for cell in graded_nb.cells:
        gid = _meta(cell).get("grade_id")
        if gid not in verdicts.passed or verdicts.passed[gid]:
            continue
        grade = gradebook.find_grade(gid, notebook, phase, student)
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
    return overrides
