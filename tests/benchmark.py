"""Measure the course's performance targets and print them (`make benchmark`).

Targets (2-core CPU): the Phase 1 solution notebook runs end to end in <= 3 minutes;
autograding one Phase 1 submission takes <= 30 s, kernel start included.
These are measurements to read, not assertions: timings depend on the machine.
"""

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).parent))
from test_autograde_roundtrip import NOTEBOOK, PHASE, course_copy, instructor, submission  # noqa: E402

from autograde import layout  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_solution_notebook() -> float:
    path = layout.SOURCE / PHASE / NOTEBOOK
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    return time.perf_counter() - start


def autograde_one_submission() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = course_copy(Path(tmp))
        inbox = Path(tmp) / "inbox" / "student"
        inbox.mkdir(parents=True)
        nbformat.write(submission(), inbox / NOTEBOOK)
        instructor(root, "collect", str(inbox.parent), "--phase", PHASE)
        start = time.perf_counter()
        first = instructor(root, "autograde")
        with_gradebook = time.perf_counter() - start
        assert first.returncode == 0, first.stdout + first.stderr
        start = time.perf_counter()
        again = instructor(root, "autograde", "--force")
        regrade = time.perf_counter() - start
        assert again.returncode == 0, again.stdout + again.stderr
        return with_gradebook, regrade


def main() -> None:
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"Phase 1 solution notebook, end to end (target <= 180 s): {run_solution_notebook():.1f} s")
    first, regrade = autograde_one_submission()
    print(f"autograde one Phase 1 submission, new gradebook included: {first:.1f} s")
    print(f"autograde one Phase 1 submission, gradebook ready (target <= 30 s): {regrade:.1f} s")


if __name__ == "__main__":
    main()
