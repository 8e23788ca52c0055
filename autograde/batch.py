"""Grade a class unattended: back up, repair, grade in parallel, verify, flag, summarise.

Each submission is one nbgrader process (sandboxed kernel, see ``sandbox.py``), then the
verifier (``verify.py``) and the suspicion scan (``suspicion.py``). Its outcome is written
to ``autograde/records/<phase>/<student>.json`` as soon as it completes, and nbgrader has
committed its grades by then: a batch killed midway loses nothing, and the next run
grades only the submissions without a record (``--force`` grades all again). Manual
scores are never touched: nbgrader keeps them and the verifier lowers auto scores only.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook, MissingEntry

from autograde import layout, manual, repair, sandbox, suspicion, verify

RECORDS = layout.STATE / "records"
BACKUPS = layout.STATE / "backups"
LOGS = layout.STATE / "logs"
# Seconds nbgrader may take over one whole submission (`autograde --submission-timeout`; by default
# the bound of each verifier run): far more than an honest one needs (36-90 s per phase, two at a time
# on 2 cores; a blank Phase 5 102 s), far less than a stalled one.
SUBMISSION_TIMEOUT = verify.WHOLE_RUN_SECONDS


def record_path(phase: str, student: str) -> Path:
    return RECORDS / phase / f"{student}.json"


def backup() -> Path | None:
    """A timestamped copy of the gradebook, taken before a batch changes it."""
    if not layout.GRADEBOOK.exists():
        return None
    BACKUPS.mkdir(parents=True, exist_ok=True)
    target = BACKUPS / f"gradebook-{datetime.now():%Y%m%d-%H%M%S-%f}.db"
    shutil.copy2(layout.GRADEBOOK, target)
    return target


def _db_url() -> str:
    return f"sqlite:///{layout.GRADEBOOK}?timeout=60"


def grade_one(phase: str, student: str, timeout: int, memory_gb: float,
              submission_timeout: float = SUBMISSION_TIMEOUT) -> dict:
    """Repair, grade, verify and scan one submission; write and return its record. nbgrader gets
    ``submission_timeout`` seconds for the whole submission: a kernel that keeps every cell just
    under the cell limit (a `pre_run_cell` hook that sleeps) is bounded by nothing else."""
    from autograde.cli import nbgrader  # the cli imports this module

    started = time.monotonic()
    folder = layout.SUBMITTED / student / phase
    record = {"student": student, "phase": phase, "status": "graded", "flags": [], "repairs": [],
              "overrides": [], "problems": [], "sandbox": sandbox.level()}
    notebooks = sorted(folder.glob("*.ipynb"))
    for path in notebooks:
        problem = repair.check(path)
        if problem:
            record["problems"].append(f"{path.name}: {problem}")
            continue
        release = layout.RELEASE / phase / path.name
        if release.exists():
            record["repairs"] += [f"{path.name}: {r}" for r in repair.restore_metadata(path, release)]
        record["flags"] += _scan(path, layout.SOURCE / phase / path.name)
    if record["problems"]:
        record["status"] = "invalid"
    else:
        LOGS.mkdir(parents=True, exist_ok=True)
        # The verifier needs only the submission and the tests: it runs while nbgrader grades.
        verifiers = {}
        try:
            for path in notebooks:
                source_path = layout.SOURCE / phase / path.name
                if source_path.exists():
                    verifiers[path.name] = verify.start(nbformat.read(path, as_version=4),
                                                      nbformat.read(source_path, as_version=4), phase, timeout,
                                                      notebook=path.stem)
            kernel_uid = sandbox.new_uid()
            try:
                with open(LOGS / f"{phase}-{student}.log", "w") as log:
                    code = nbgrader("autograde", phase, f"--student={student}", "--force",
                                    f"--Execute.timeout={timeout}", log=log, timeout=submission_timeout,
                                    env={"AUTOGRADE_MEMORY_GB": str(memory_gb),
                                         "AUTOGRADE_SANDBOX": sandbox.level(),
                                         "AUTOGRADE_UID": str(kernel_uid)})
            except subprocess.TimeoutExpired:
                code = None
            finally:
                if sandbox.IS_ROOT:  # whatever the submission left running as its kernel's uid
                    sandbox.kill_user(kernel_uid)
            if code is None:
                record["status"] = "failed"
                record["problems"].append(f"grading stopped after {submission_timeout:g} s "
                                          "(autograde --submission-timeout): not scored")
            elif code:
                record["status"] = "failed"
                record["problems"].append(f"nbgrader exited with {code}; see autograde/logs/{phase}-{student}.log")
            else:
                _verify(record, phase, student, notebooks, timeout, verifiers)
        finally:
            for job in verifiers.values():  # those _verify did not use
                verify.cancel(job)
    record["seconds"] = round(time.monotonic() - started, 1)
    record.update(_scores(phase, student))
    # Written answers are left to people (Formgrader, or `python -m autograde score`).
    record["written_ungraded"] = manual.ungraded(phase, student)
    path = record_path(phase, student)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def _scan(path: Path, source_path: Path) -> list[str]:
    """The suspicion flags of the student's editable cells (solution cells and added cells)."""
    nb = nbformat.read(path, as_version=4)
    editable = [c.source for c in nb.cells if c.cell_type == "code"
                and (c.metadata.get("nbgrader", {}).get("solution") or "nbgrader" not in c.metadata)]
    setup = ""
    if source_path.exists():
        setup = next((c.source for c in nbformat.read(source_path, as_version=4).cells
                      if c.metadata.get("nbgrader", {}).get("grade_id") == "setup"), "")
    return suspicion.flags(editable, setup)


def _verify(record: dict, phase: str, student: str, notebooks: list[Path], timeout: int, verifiers: dict) -> None:
    with Gradebook(_db_url()) as gradebook:
        for path in notebooks:
            source_path = layout.SOURCE / phase / path.name
            graded_path = layout.AUTOGRADED / student / phase / path.name
            if not source_path.exists() or not graded_path.exists():
                continue
            source = nbformat.read(source_path, as_version=4)
            overrides, feedback, judged = verify.apply(gradebook, graded_path, source, phase, path.stem, student,
                                                       timeout, started=verifiers.pop(path.name, None))
            record["overrides"] += [dict(o, notebook=path.name) for o in overrides]
            # The tests decided by the judge, which runs no student code (autograde/judge.py).
            record.setdefault("judged", {})[path.name] = judged["judged"]
            record["flags"] += judged["flags"]
            # What the student's feedback may say per test cell (autograde/feedback.py reads it).
            record.setdefault("feedback", {})[path.name] = feedback


def _scores(phase: str, student: str) -> dict:
    try:
        with Gradebook(_db_url()) as gradebook:
            submission = gradebook.find_submission(phase, student)
            return {"score": submission.score, "max_score": submission.max_score}
    except MissingEntry:
        return {"score": None, "max_score": None}


def pending(phases: list[str], student: str | None, force: bool) -> list[tuple[str, str]]:
    """The (phase, student) submissions to grade: all with --force, else those without a record."""
    jobs = []
    for phase in phases:
        for folder in sorted(layout.SUBMITTED.glob(f"*/{phase}")):
            name = folder.parent.name
            if (student is None or name == student) and (force or not record_path(phase, name).exists()):
                jobs.append((phase, name))
    return jobs


def run(phases: list[str], student: str | None = None, force: bool = False, timeout: int = 120,
        memory_gb: float = 8.0, workers: int = 1, submission_timeout: float = SUBMISSION_TIMEOUT) -> int:
    """Grade the pending submissions, ``workers`` at a time; print a summary. Exit code 1 when
    a submission could not be graded (failed or invalid)."""
    from tqdm import tqdm

    jobs = pending(phases, student, force)
    if not jobs:
        print("nothing to grade: every submission has a record (use --force to grade again)")
        return 0
    _share_cores(workers)
    saved = backup()
    if saved:
        print(f"gradebook backed up to {saved.relative_to(layout.ROOT)}")
    if sandbox.warning():
        print(f"WARNING: {sandbox.warning()}", file=sys.stderr)
    records = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(jobs), unit="submission", desc="grading") as bar:
        futures = {pool.submit(grade_one, phase, name, timeout, memory_gb, submission_timeout): (phase, name)
                   for phase, name in jobs}
        for future in as_completed(futures):
            phase, name = futures[future]
            try:
                records.append(future.result())
            except Exception as error:  # a bug of ours must not stop the class being graded
                records.append({"student": name, "phase": phase, "status": "failed", "flags": [],
                                "overrides": [], "problems": [repr(error)], "seconds": 0})
            bar.update()
    print(summary(records))
    return 1 if any(r["status"] != "graded" for r in records) else 0


def _share_cores(workers: int) -> None:
    """Give every kernel its share of the cores: ``workers`` submissions at a time, each graded by two
    processes at once (nbgrader's kernel and the verifier). PyTorch starts one thread per core in
    each; more threads than cores make every parallel operation wait for threads that are not
    running (measured: README, "Throughput"). An instructor's own OMP_NUM_THREADS is kept."""
    threads = max(1, (os.cpu_count() or 1) // (2 * max(1, workers)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def summary(records: list[dict]) -> str:
    """A table, one row per submission, and the totals."""
    rows = [("phase", "student", "status", "score", "flags", "overrides", "seconds")]
    for r in sorted(records, key=lambda r: (r["phase"], r["student"])):
        score = "" if r.get("score") is None else f"{r['score']:g}/{r['max_score']:g}"
        rows.append((r["phase"], r["student"], r["status"], score, str(len(r["flags"])),
                     str(len(r["overrides"])), f"{r.get('seconds', 0):.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    count = {s: sum(r["status"] == s for r in records) for s in ("graded", "failed", "invalid")}
    flagged = sum(bool(r["flags"]) for r in records)
    lines.append(f"{len(records)} submission(s): {count['graded']} graded, {count['failed']} failed, "
                 f"{count['invalid']} invalid, {flagged} flagged for review, "
                 f"{sum(bool(r['overrides']) for r in records)} with scores lowered by the verifier")
    written = sum(r.get("written_ungraded") or 0 for r in records)
    if written:
        lines.append(f"{written} written answer(s) await manual grading: Formgrader, or "
                     "`python -m autograde score PHASE STUDENT CELL POINTS`")
    level = sandbox.level()
    lines.append(f"sandbox: {level}" + (f" (WARNING: {sandbox.warning()})" if sandbox.warning() else ""))
    return "\n".join(lines)


def annotate_export(csv_path: Path) -> None:
    """Add each submission's grading status and flags to nbgrader's grade export."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    for row in rows:
        path = record_path(row["assignment"], row["student_id"])
        record = json.loads(path.read_text()) if path.exists() else {}
        row["grading"] = record.get("status", "not submitted" if not row.get("timestamp") else "")
        notes = record.get("problems", []) + record.get("repairs", []) + record.get("flags", []) + [
            f"verifier: {o['cell']} {o['reason']}" for o in record.get("overrides", [])]
        row["review"] = "; ".join(notes)
    # An invalid submission never reached nbgrader: list it too rather than drop it silently.
    listed = {(r["assignment"], r["student_id"]) for r in rows}
    for path in sorted(RECORDS.glob("*/*.json")):
        record = json.loads(path.read_text())
        if (record["phase"], record["student"]) not in listed:
            rows.append({"assignment": record["phase"], "student_id": record["student"],
                         "grading": record["status"], "review": "; ".join(record["problems"])})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()), restval="")
        writer.writeheader()
        writer.writerows(rows)
