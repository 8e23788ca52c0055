"""Measure the course's performance targets and print them (`make benchmark`).

    python tests/benchmark.py                       # every phase
    python tests/benchmark.py --phase 03_pretraining --skip-autograde

Targets on a 2-core CPU: each solution notebook runs end to end within its budget (Phase 1: 3
minutes; later phases: 5 minutes), and autograding one submission (sandboxed, verified, kernel start
included) takes <= 30 s for Phase 1 and <= 60 s for the later phases. These are measurements to
read, not assertions: timings depend on the machine and on what else runs on it.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from machine import describe  # noqa: E402
from test_autograde_phases import notebook_of, solved  # noqa: E402
from test_autograde_roundtrip import course_copy, instructor  # noqa: E402

from autograde import layout  # noqa: E402

# Seconds: (notebook end to end, autograding one submission).
TARGETS = {"01_attention": (180, 30)}
LATER_PHASES = (300, 60)



def run_solution_notebook(phase: str) -> float:
    path = layout.SOURCE / phase / notebook_of(phase)
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, resources={"metadata": {"path": str(path.parent)}}).execute()
    return time.perf_counter() - start


def autograde_one_submission(phase: str) -> tuple[float, float, str]:
    """Autograde one fully solved submission twice (new gradebook, then --force): both times and
    the batch's summary line for it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = course_copy(Path(tmp))
        inbox = Path(tmp) / "inbox" / "student"
        inbox.mkdir(parents=True)
        nbformat.write(solved(phase), inbox / notebook_of(phase))
        instructor(root, "collect", str(inbox.parent), "--phase", phase)
        start = time.perf_counter()
        first = instructor(root, "autograde", "--phase", phase)
        with_gradebook = time.perf_counter() - start
        assert first.returncode == 0, first.stdout + first.stderr
        start = time.perf_counter()
        again = instructor(root, "autograde", "--phase", phase, "--force")
        regrade = time.perf_counter() - start
        assert again.returncode == 0, again.stdout + again.stderr
        summary = next((line.strip() for line in again.stdout.splitlines() if line.strip().startswith(phase)), "")
        return with_gradebook, regrade, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", action="append", choices=layout.available_phases(),
                        help="measure this phase (repeatable; default: every phase)")
    parser.add_argument("--skip-notebook", action="store_true", help="leave out the notebook runs")
    parser.add_argument("--skip-autograde", action="store_true", help="leave out the autograding runs")
    args = parser.parse_args()

    print(describe())
    for phase in args.phase or layout.available_phases():
        notebook_target, grading_target = TARGETS.get(phase, LATER_PHASES)
        print(f"\n{phase}")
        if not args.skip_notebook:
            print(f"  solution notebook, end to end (target <= {notebook_target} s): "
                  f"{run_solution_notebook(phase):.1f} s")
        if not args.skip_autograde:
            first, regrade, summary = autograde_one_submission(phase)
            print(f"  autograde one submission, new gradebook included: {first:.1f} s")
            print(f"  autograde one submission, gradebook ready (target <= {grading_target} s): {regrade:.1f} s")
            print(f"  batch summary: {summary}")


if __name__ == "__main__":
    main()
