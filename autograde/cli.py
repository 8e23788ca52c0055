"""The instructor's commands: ``python -m autograde <command>`` from the repository root.

Each command is a thin layer over nbgrader's own; what nbgrader lacks is added
here: regenerating every phase, collecting from a plain folder, sandboxed and
verified parallel grading (``batch.py``), manual scores for written answers
from the command line with bounds checked (``manual.py``), and a validate that
fails with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from autograde import batch, layout, manual, notebooks


def nbgrader(*args: str, env: dict | None = None, log=None, timeout: float | None = None) -> int:
    """Run an nbgrader command from the repository root (where its config is); return its exit code.
    ``env`` adds variables; ``log`` (a file) receives its output instead of the terminal. After
    ``timeout`` seconds the command and everything in its process group are killed and
    ``subprocess.TimeoutExpired`` is raised."""
    full_env = dict(os.environ, **(env or {}))
    # A new gradebook runs the `alembic` found on PATH: it must be this environment's.
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    # `python -m nbgrader`, after `import utils` (2 s less to start: see utils/__init__.py).
    launch = "import utils; from nbgrader.apps.nbgraderapp import main; main()"
    process = subprocess.Popen([sys.executable, "-c", launch, *args], cwd=layout.ROOT, env=full_env,
                               stdout=log, stderr=subprocess.STDOUT if log else None,
                               start_new_session=timeout is not None)
    try:
        return process.wait(timeout=timeout)
    except BaseException:  # the time is up, or Ctrl-C (which does not reach nbgrader's own group)
        if timeout is not None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def _phases(selected: list[str] | None) -> list[str]:
    phases = layout.available_phases()
    for phase in selected or []:
        if phase not in phases:
            raise SystemExit(f"unknown phase {phase!r}; the phases are {', '.join(phases)}")
    return selected or phases


def release(args) -> int:
    """Regenerate course/ (the student notebooks) from solutions/."""
    for phase in _phases(args.phase):
        code = nbgrader("generate_assignment", phase, "--force", "--no-db")
        if code:
            return code
        for path in sorted((layout.RELEASE / phase).rglob("*.ipynb")):
            notebooks.clean_file(path)
    return 0


def clean(args) -> int:
    """Strip outputs, execution counts and volatile metadata from every source notebook."""
    for path in sorted(layout.SOURCE.rglob("*.ipynb")):
        if ".ipynb_checkpoints" not in path.parts and notebooks.clean_file(path):
            print(f"cleaned {path.relative_to(layout.ROOT)}")
    return 0


SYNCED = layout.GRADEBOOK.with_name("gradebook-synced.json")


def _source_digest(phase: str) -> str:
    digest = hashlib.sha256()
    for path in sorted((layout.SOURCE / phase).rglob("*.ipynb")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _in_gradebook(phase: str) -> bool:
    """Whether the gradebook holds the phase with the graded cells (names and points) of its source."""
    import nbformat
    from nbgrader.api import Gradebook, MissingEntry

    if not layout.GRADEBOOK.exists():
        return False
    try:
        with Gradebook(f"sqlite:///{layout.GRADEBOOK}") as gradebook:
            assignment = gradebook.find_assignment(phase)
            recorded = {(nb.name, cell.name, float(cell.max_score)) for nb in assignment.notebooks
                        for cell in nb.grade_cells}
    except MissingEntry:
        return False
    expected = set()
    for path in (layout.SOURCE / phase).rglob("*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade"):
                expected.add((path.stem, meta["grade_id"], float(meta.get("points", 0))))
    return recorded == expected


def sync_gradebook(phases: list[str]) -> int:
    """Record the phases' graded cells in the gradebook, which autograding needs.

    course/ is generated without the gradebook (--no-db); here the same generation runs into a
    throw-away folder, with the gradebook. Skipped (about 7 s per phase) for a phase whose source
    notebooks have not changed since the last sync and whose graded cells the gradebook holds.
    """
    synced = json.loads(SYNCED.read_text()) if SYNCED.exists() else {}
    with tempfile.TemporaryDirectory() as scratch:
        for phase in phases:
            digest = _source_digest(phase)
            if synced.get(phase) == digest and _in_gradebook(phase):
                continue
            code = nbgrader("generate_assignment", phase, "--force",
                            f"--CourseDirectory.release_directory={scratch}")
            if code:
                return code
            synced[phase] = digest
            SYNCED.write_text(json.dumps(synced, indent=1))
    return 0


def collect(args) -> int:
    """Copy submissions from a folder of <student>/<notebook>.ipynb into autograde/submitted."""
    [phase] = _phases([args.phase])
    source = Path(args.folder)
    count = 0
    for student_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(student_dir.glob("*.ipynb")) or sorted(student_dir.glob(f"{phase}/*.ipynb"))
        if not files:
            continue
        target = layout.SUBMITTED / student_dir.name / phase
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)
        stamp = datetime.fromtimestamp(max(f.stat().st_mtime for f in files), timezone.utc)
        (target / "timestamp.txt").write_text(stamp.strftime("%Y-%m-%d %H:%M:%S.%f %Z"))
        count += 1
    print(f"collected {count} submission(s) of {phase}")
    return 0


def collect_zip(args) -> int:
    """Collect an LMS bulk download (a zip of <student>_<notebook>.ipynb files) with nbgrader's zip_collect."""
    [phase] = _phases([args.phase])
    archive = layout.DOWNLOADED / phase / "archive"
    archive.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.zipfile, archive)
    return nbgrader("zip_collect", phase, "--force")


def autograde(args) -> int:
    """Grade every collected submission (or one student's) in parallel, sandboxed and verified."""
    phases = [p for p in _phases(args.phase) if any(layout.SUBMITTED.glob(f"*/{p}"))]
    if not phases:
        print("nothing to grade: no submissions in autograde/submitted")
        return 0
    code = sync_gradebook(phases)
    if code:
        return code
    return batch.run(phases, student=args.student, force=args.force, timeout=args.timeout,
                     memory_gb=args.memory_gb, workers=args.workers,
                     submission_timeout=args.submission_timeout)


def feedback(args) -> int:
    """Write HTML feedback for every autograded submission (hidden tests removed)."""
    phases = [p for p in _phases(args.phase) if any(layout.AUTOGRADED.glob(f"*/{p}"))]
    status = 0
    for phase in phases:
        status |= nbgrader("generate_feedback", phase, "--force")
    return status


def export(args) -> int:
    """Export every grade in the gradebook to a CSV file, with each submission's grading status and flags."""
    target = Path(args.to).resolve()
    code = nbgrader("export", f"--to={target}")
    if not code:
        batch.annotate_export(target)
        # auto_points / manual_points / written_ungraded: what the tests gave, what people gave, what is left.
        manual.annotate_export(target)
    return code


def score(args) -> int:
    """Give a written answer (or any graded cell) a manual score, as Formgrader does; bounds checked."""
    try:
        print(manual.set_score(args.phase, args.student, args.cell, args.points, args.comment, args.notebook))
    except manual.ScoreRefused as refusal:
        print(f"refused: {refusal}", file=sys.stderr)
        return 2
    return 0


def validate(args) -> int:
    """Run notebooks as nbgrader's Validate button does; exit 1 if any test fails."""
    from nbgrader.validator import Validator
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(layout.ROOT)).load_config()
    validator = Validator(config=config)
    failed = 0
    for name in args.notebooks:
        results = validator.validate(str(Path(name).resolve()))
        problems = {k: v for k, v in results.items() if k in ("failed", "changed", "type_changed")}
        # An unanswered written question is a reminder, not a failing test: people grade those.
        unanswered = [c for c in problems.get("failed", []) if "did not provide a response" in (c.get("raw_error") or "")]
        if unanswered:
            problems["failed"] = [c for c in problems["failed"] if c not in unanswered]
            problems = {k: v for k, v in problems.items() if v}
            print(f"{name}: {len(unanswered)} written answer(s) still to write (graded by your instructor)")
        if not problems:
            print(f"{name}: all visible tests pass.")
            continue
        failed += 1
        for kind, cells in problems.items():
            what = {"failed": "failing test cell(s)", "changed": "test cell(s) edited",
                    "type_changed": "cell(s) whose type changed"}[kind]
            print(f"{name}: {len(cells)} {what}")
            for cell in cells:
                print("  - " + (cell["source"].splitlines() or ["(empty cell)"])[0])
                if cell.get("raw_error"):
                    print("    " + cell["raw_error"].strip().splitlines()[-1])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autograde", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(func, help_text=None):
        p = sub.add_parser(func.__name__.replace("_", "-"), help=help_text or func.__doc__.splitlines()[0])
        p.set_defaults(func=func)
        return p

    command(release).add_argument("--phase", action="append", help="only this phase (repeatable)")
    command(clean)
    p = command(collect)
    p.add_argument("folder")
    p.add_argument("--phase", required=True)
    p = command(collect_zip)
    p.add_argument("zipfile")
    p.add_argument("--phase", required=True)
    p = command(autograde)
    p.add_argument("--phase", action="append")
    p.add_argument("--student")
    p.add_argument("--force", action="store_true", help="grade again submissions already graded")
    p.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit per submission")
    p.add_argument("--timeout", type=int, default=120, help="seconds a cell may run")
    p.add_argument("--submission-timeout", type=float, default=batch.SUBMISSION_TIMEOUT,
                   help="seconds nbgrader may take over one submission before it is stopped")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="submissions graded at once (default: one per core)")
    command(feedback).add_argument("--phase", action="append")
    command(export).add_argument("--to", default=str(layout.STATE / "grades.csv"))
    p = command(score)
    p.add_argument("phase")
    p.add_argument("student")
    p.add_argument("cell", help="the answer cell's grade_id, e.g. written_post_ln")
    p.add_argument("points", type=float, help="between 0 and the cell's points")
    p.add_argument("--comment", help="shown to the student in the feedback")
    p.add_argument("--notebook", help="the notebook's name without .ipynb (when the phase has several)")
    command(validate).add_argument("notebooks", nargs="+")

    args = parser.parse_args(argv)
    return args.func(args)
