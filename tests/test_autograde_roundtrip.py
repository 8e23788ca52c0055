"""The instructor's whole loop through the real nbgrader commands, on a temporary copy of the course:
collect (folder and LMS zip), autograde under limits, feedback, export, validate.

One batch holds an honest full solution, the untouched release, one wrong exercise, a deleted test
cell, an infinite loop and a memory bomb; each must get exactly the marks it deserves.
"""

import csv
import html
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from autograde import layout
from notebook_harness import SourceNotebook

PHASE = "01_attention"
NOTEBOOK = "attention.ipynb"
SOURCE = SourceNotebook(f"solutions/{PHASE}/{NOTEBOOK}")

# Exercise 2 with the 1/sqrt(d) scale forgotten: a realistic wrong answer.
MISSING_SCALE = SOURCE.solution_source("ex2").replace("/ math.sqrt(d)", "")
assert MISSING_SCALE != SOURCE.solution_source("ex2"), "update MISSING_SCALE to the new solution"


def points(exercise):
    return sum(SOURCE.cells[g].metadata["nbgrader"]["points"] for g in SOURCE.tests_of(exercise))


TOTAL = sum(points(e) for e in SOURCE.exercises())


def submission(replace=None, delete=()):
    """The released notebook with every exercise solved, except where `replace` gives other code."""
    replace = replace or {}
    nb = nbformat.read(layout.RELEASE / PHASE / NOTEBOOK, as_version=4)
    kept = []
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in delete:
            continue
        if gid and gid.endswith("_solution"):
            exercise = gid.removesuffix("_solution")
            cell.source = replace.get(exercise, SOURCE.solution_source(exercise))
        kept.append(cell)
    nb.cells = kept
    return nb


def untouched():
    return nbformat.read(layout.RELEASE / PHASE / NOTEBOOK, as_version=4)


# Every function of the cell warns and draws a progress bar when the test cell calls it. Both write
# to stderr, which nbgrader scores as a failed test: a correct answer must not lose marks for it.
NOISE = """
import functools, sys, warnings, tqdm
def _noisy(function):
    @functools.wraps(function)
    def noisy(*args, **kwargs):
        warnings.warn("a harmless warning")
        for _ in tqdm.tqdm(range(2)):
            pass
        return function(*args, **kwargs)
    return noisy
for _name in ("causal_mask", "padding_mask", "attention_mask"):
    globals()[_name] = _noisy(globals()[_name])
"""
HONEST_WITH_NOISE = submission(replace={"ex3": SOURCE.solution_source("ex3") + NOISE})

STUDENTS = {
    # name: (notebook, marks lost per exercise)
    "alice": (HONEST_WITH_NOISE, {}),
    "bob": (untouched(), {e: points(e) for e in SOURCE.exercises()}),
    "carol": (submission(replace={"ex2": MISSING_SCALE}), {"ex2": points("ex2")}),
    "dave": (submission(replace={"ex1": "while True:\n    pass\n" + SOURCE.solution_source("ex1")}),
             {"ex1": points("ex1")}),
    # 12 GiB is more than the 6 GiB limit and less than the machine has: only the limit stops it.
    "eve": (submission(replace={"ex3": "hog = bytearray(12 * 2**30)\n" + SOURCE.solution_source("ex3")}),
            {"ex3": points("ex3")}),
    "frank": (submission(delete={SOURCE.tests_of("ex3")[0]}), {}),
}


def course_copy(tmp: Path) -> Path:
    root = tmp / "course-copy"
    for name in ("solutions", "course"):
        shutil.copytree(layout.ROOT / name, root / name)
    (root / "autograde").mkdir()
    for script in (layout.ROOT / "autograde").glob("*.py"):
        shutil.copy2(script, root / "autograde")
    shutil.copy2(layout.ROOT / "autograde" / "replayable.json", root / "autograde")  # the judge's list
    shutil.copy2(layout.ROOT / "nbgrader_config.py", root)
    return root


def instructor(root, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "autograde", *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = course_copy(tmp_path_factory.mktemp("roundtrip"))
    inbox = root.parent / "inbox"
    lms = root.parent / "lms"
    lms.mkdir()
    for name, (nb, _) in STUDENTS.items():
        if name == "carol":  # carol submitted through the LMS
            nbformat.write(nb, lms / f"carol_1234_5678_{NOTEBOOK}")
        else:
            (inbox / name).mkdir(parents=True)
            nbformat.write(nb, inbox / name / NOTEBOOK)
    with zipfile.ZipFile(root.parent / "lms.zip", "w") as z:
        for f in lms.iterdir():
            z.write(f, f.name)

    logs = {}
    for step in (["collect", str(inbox), "--phase", PHASE],
                 ["collect-zip", str(root.parent / "lms.zip"), "--phase", PHASE],
                 ["autograde", "--timeout", "15", "--memory-gb", "6"],
                 ["feedback"],
                 ["export", "--to", str(root / "grades.csv")]):
        result = instructor(root, *step)
        logs[step[0]] = result
    return root, logs


def scores(root, student):
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        nb = gb.find_submission_notebook(NOTEBOOK.removesuffix(".ipynb"), PHASE, student)
        return {g.name: g.score for g in nb.grades}


def test_collection_and_grading_ran(graded):
    root, logs = graded
    for step in ("collect", "collect-zip", "feedback", "export"):
        assert logs[step].returncode == 0, logs[step].stdout + logs[step].stderr
    submitted = sorted(p.name for p in (root / "autograde" / "submitted").iterdir())
    assert submitted == sorted(STUDENTS)


@pytest.mark.parametrize("student", sorted(STUDENTS))
def test_each_submission_gets_exactly_its_marks(graded, student):
    root, _ = graded
    got = scores(root, student)
    lost = STUDENTS[student][1]
    for exercise in SOURCE.exercises():
        earned = sum(got[g] for g in SOURCE.tests_of(exercise))
        expected = points(exercise) - lost.get(exercise, 0)
        assert earned == expected, f"{student} earned {earned} on {exercise}, expected {expected}"


def test_untouched_release_runs_to_the_end(graded):
    root, _ = graded
    nb = nbformat.read(root / "autograde" / "autograded" / "bob" / PHASE / NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "grading stopped before the last cell"


def test_deleted_test_cell_is_restored(graded):
    root, _ = graded
    nb = nbformat.read(root / "autograde" / "autograded" / "frank" / PHASE / NOTEBOOK, as_version=4)
    ids = {c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells}
    assert SOURCE.tests_of("ex3")[0] in ids


def feedback_text(root, student):
    page = (root / "autograde" / "feedback" / student / PHASE / NOTEBOOK.replace(".ipynb", ".html")).read_text()
    page = re.sub(r"<(style|script)[^>]*>.*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def hidden_lines():
    lines = set()
    for gid in (g for e in SOURCE.exercises() for g in SOURCE.tests_of(e)):
        region = re.search(r"### BEGIN HIDDEN TESTS(.*)### END HIDDEN TESTS", SOURCE.cells[gid].source, re.S)
        lines |= {line.strip() for line in region.group(1).splitlines() if len(line.strip()) > 12}
    visible = nbformat.writes(untouched())
    return {line for line in lines if line not in visible}


@pytest.mark.parametrize("student", ["alice", "carol", "dave"])
def test_feedback_shows_failures_but_no_hidden_test(graded, student):
    root, _ = graded
    text = feedback_text(root, student)
    leaked = [line for line in hidden_lines() if line in text]
    assert not leaked, f"hidden tests leak into {student}'s feedback: {leaked[:3]}"
    failed_marker = "This test did not pass"
    assert (failed_marker in text) == bool(STUDENTS[student][1])


def test_export_lists_every_student(graded):
    root, _ = graded
    with open(root / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["student_id"] for r in rows) == sorted(STUDENTS)
    alice = next(r for r in rows if r["student_id"] == "alice")
    # Written answers are graded by people later: the test cells' points are the autograder's.
    assert float(alice["auto_points"]) == float(alice["auto_max"]) == TOTAL


def test_validate_exits_nonzero_on_failures_and_zero_on_success(graded):
    root, _ = graded
    failing = root / "autograde" / "submitted" / "bob" / PHASE / NOTEBOOK
    passing = root / "autograde" / "submitted" / "alice" / PHASE / NOTEBOOK
    result = instructor(root, "validate", str(failing))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failing test cell" in result.stdout
    result = instructor(root, "validate", str(passing))
    assert result.returncode == 0, result.stdout + result.stderr
