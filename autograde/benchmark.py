"""Time sandboxed, verified grading: one Phase 1 submission, then a batch of 20.

    python -m autograde.benchmark [--phase 01_attention] [--batch 20] [--workers N]

Runs on a temporary copy of the course with the reference solutions as submissions;
prints the machine, the sandbox level and the wall times (targets: 20 s and 4 minutes on 2 cores);
the verifier runs beside nbgrader, and an unchanged phase is not recorded in the gradebook again.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from autograde import layout, sandbox


def _course_copy(target: Path) -> Path:
    for name in ("solutions", "course", "autograde"):
        shutil.copytree(layout.ROOT / name, target / name,
                        ignore=shutil.ignore_patterns("submitted", "autograded", "feedback", "records",
                                                      "backups", "logs", "*.db", "__pycache__"))
    shutil.copy2(layout.ROOT / "nbgrader_config.py", target)
    return target


def _solved(phase: str, name: str):
    """The released notebook with the reference solutions in its solution cells."""
    source = nbformat.read(layout.SOURCE / phase / name, as_version=4)
    solutions = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                 if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.read(layout.RELEASE / phase / name, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in solutions:
            cell.source = solutions[gid]
    return nb


def _grade(root: Path, phase: str, students: int, workers: int | None = None) -> float:
    for i in range(students):
        folder = root / "autograde" / "submitted" / f"student{i:02d}" / phase
        folder.mkdir(parents=True, exist_ok=True)
        for path in (layout.RELEASE / phase).glob("*.ipynb"):
            nbformat.write(_solved(phase, path.name), folder / path.name)
    started = time.monotonic()
    command = [sys.executable, "-m", "autograde", "autograde", "--phase", phase, "--force"]
    if workers:
        command += ["--workers", str(workers)]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if result.returncode:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default=layout.available_phases()[0])
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--workers", type=int, help="submissions graded at a time (autograde's default: one per core)")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"sandbox: {sandbox.level()}")
    with tempfile.TemporaryDirectory() as scratch:
        root = _course_copy(Path(scratch))
        # The first command records the phase in a new gradebook (about 7 s); later ones skip that.
        for students, label in ((1, "the first command, gradebook sync included"),
                                (1, "gradebook already synced"), (args.batch, "gradebook already synced")):
            seconds = _grade(root, args.phase, students, args.workers)
            print(f"{args.phase}: {students} submission(s) graded in {seconds:.1f} s ({label}), "
                  "command start to summary")


if __name__ == "__main__":
    main()
