"""Written answers are graded by people: the tooling leaves them alone and keeps what people gave.

A throwaway one-notebook phase (one autograded exercise, one written question) is built in a
temporary course and taken through the instructor's commands: release, collect, autograde,
manual scores from the command line (bad ones refused), autograde --force, feedback, export.
Its students: ann answers everything, ben deleted the written-answer cell, cat's notebook lost its
nbgrader metadata (saved by another editor).
"""

from __future__ import annotations

import copy
import csv
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from nbgrader.api import Gradebook

from autograde import layout, repair

PHASE = "01_attention"
NOTEBOOK = "written"
WRITTEN = "written_why"
MODEL_ANSWER = "Doubling is linear, so the hidden test's negative input behaves like the visible one."
RUBRIC = "1 point: says doubling is linear; 1 point: connects it to the negative input."
QUESTION = "**Question.** Why does the hidden test pass once the visible one does?"
ANN_ANSWER = "Because multiplying by two works the same for negative numbers."
COMMENT = "Right idea; say why linearity matters."


def _meta(grade_id, grade=False, solution=False, locked=False, points=None):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3, "solution": solution}
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


def source_notebook():
    """The nbgrader source: set-up, one exercise with a hidden test, a written question."""
    cells = [
        new_markdown_cell("# A phase in miniature"),
        new_code_cell("import math", metadata=_meta("setup", locked=True)),
        new_code_cell("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
                      metadata=_meta("ex1_solution", solution=True)),
        new_code_cell("assert double(2) == 4, 'double(2) should be 4'\n"
                      "### BEGIN HIDDEN TESTS\nassert double(-3) == -6\n### END HIDDEN TESTS",
                      metadata=_meta("ex1_test_values", grade=True, locked=True, points=2)),
        new_markdown_cell(QUESTION),
        new_markdown_cell(f"### BEGIN SOLUTION\n**Model answer.** {MODEL_ANSWER}\n\n"
                          f"**Rubric (2 points).** {RUBRIC}\n### END SOLUTION",
                          metadata=_meta(WRITTEN, grade=True, solution=True, points=2)),
        new_markdown_cell("## What to read next"),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "LLM course", "language": "python", "name": "llm-course"},
                   "language_info": {"name": "python"}}
    return nb


def instructor(root, *args):
    return subprocess.run([sys.executable, "-m", "autograde", *args], cwd=root,
                          capture_output=True, text=True, timeout=600)


def build_course(root: Path) -> None:
    """A course folder with the tooling and the miniature phase, its release generated."""
    (root / "solutions" / PHASE).mkdir(parents=True)
    (root / "autograde").mkdir()
    for script in (layout.ROOT / "autograde").glob("*.py"):
        shutil.copy2(script, root / "autograde")
    shutil.copy2(layout.ROOT / "nbgrader_config.py", root)
    nbformat.write(source_notebook(), root / "solutions" / PHASE / f"{NOTEBOOK}.ipynb")
    result = instructor(root, "release")
    assert result.returncode == 0, result.stdout + result.stderr


def submissions(release) -> dict:
    def solved():
        nb = copy.deepcopy(release)
        for cell in nb.cells:
            gid = cell.metadata.get("nbgrader", {}).get("grade_id")
            if gid == "ex1_solution":
                cell.source = "def double(x):\n    return x + x"
            if gid == WRITTEN:
                cell.source = ANN_ANSWER
        return nb

    ann = solved()
    ben = solved()
    ben.cells = [c for c in ben.cells if c.metadata.get("nbgrader", {}).get("grade_id") != WRITTEN]
    cat = solved()
    for cell in cat.cells:  # another editor: no nbgrader metadata, new cell ids
        cell.metadata = {}
        cell["id"] = f"new-{id(cell)}"
    return {"ann": ann, "ben": ben, "cat": cat}


def written_grade(root, student):
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        grade = gb.find_grade(WRITTEN, NOTEBOOK, PHASE, student)
        comment = gb.find_comment(WRITTEN, NOTEBOOK, PHASE, student)
        return {"auto": grade.auto_score, "manual": grade.manual_score, "score": grade.score,
                "needs_manual_grade": grade.needs_manual_grade, "comment": comment.manual_comment,
                "test": gb.find_grade("ex1_test_values", NOTEBOOK, PHASE, student).score}


def export(root, name):
    result = instructor(root, "export", "--to", str(root / name))
    assert result.returncode == 0, result.stdout + result.stderr
    with open(root / name) as f:
        return {row["student_id"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The whole instructor flow, run once; each step's results kept for the tests."""
    root = tmp_path_factory.mktemp("manual") / "course"
    build_course(root)
    release = nbformat.read(root / "course" / PHASE / f"{NOTEBOOK}.ipynb", as_version=4)
    inbox = root.parent / "inbox"
    for student, nb in submissions(release).items():
        (inbox / student).mkdir(parents=True)
        nbformat.write(nb, inbox / student / f"{NOTEBOOK}.ipynb")
    steps = {"release": release}
    steps["collect"] = instructor(root, "collect", str(inbox), "--phase", PHASE)
    steps["autograde"] = instructor(root, "autograde")
    steps["first"] = {s: written_grade(root, s) for s in ("ann", "ben", "cat")}
    steps["export_before"] = export(root, "before.csv")
    steps["too_high"] = instructor(root, "score", PHASE, "ann", WRITTEN, "3")
    steps["negative"] = instructor(root, "score", PHASE, "ann", WRITTEN, "-1")
    steps["not_a_number"] = instructor(root, "score", PHASE, "ann", WRITTEN, "nan")
    steps["test_comment"] = instructor(root, "score", PHASE, "ann", "ex1_test_values", "1", "--comment", "x")
    steps["refused"] = written_grade(root, "ann")
    steps["score"] = instructor(root, "score", PHASE, "ann", WRITTEN, "1.5", "--comment", COMMENT)
    steps["scored"] = written_grade(root, "ann")
    steps["regrade"] = instructor(root, "autograde", "--force", "--student", "ann")
    steps["after"] = {s: written_grade(root, s) for s in ("ann", "ben", "cat")}
    steps["feedback"] = instructor(root, "feedback")
    steps["export_after"] = export(root, "after.csv")
    return root, steps


def test_autograde_leaves_written_answers_to_people(course):
    root, steps = course
    assert steps["collect"].returncode == 0, steps["collect"].stdout + steps["collect"].stderr
    assert steps["autograde"].returncode == 0, steps["autograde"].stdout + steps["autograde"].stderr
    for student, grade in steps["first"].items():
        assert grade["test"] == 2, f"{student}'s exercise should pass"
        assert grade["auto"] is None and grade["manual"] is None and grade["score"] == 0, grade
        assert grade["needs_manual_grade"], f"{student}'s written answer is not marked for a person"
    assert "3 written answer(s) await manual grading" in steps["autograde"].stdout, steps["autograde"].stdout


def test_release_shows_the_placeholder_not_the_model_answer(course):
    _, steps = course
    [answer] = [c for c in steps["release"].cells if c.metadata.get("nbgrader", {}).get("grade_id") == WRITTEN]
    assert answer.source == "YOUR ANSWER HERE"
    text = nbformat.writes(steps["release"])
    assert MODEL_ANSWER not in text and RUBRIC not in text and QUESTION in text


def test_export_separates_automatic_and_manual_points(course):
    _, steps = course
    for student in ("ann", "ben", "cat"):
        row = steps["export_before"][student]
        assert (row["auto_points"], row["auto_max"], row["manual_points"], row["manual_max"],
                row["written_ungraded"]) == ("2", "2", "0", "2", "1"), row
    ann = steps["export_after"]["ann"]
    assert (ann["auto_points"], ann["manual_points"], ann["written_ungraded"]) == ("2", "1.5", "0"), ann
    assert float(ann["score"]) == 3.5
    assert steps["export_after"]["ben"]["written_ungraded"] == "1"


def test_bad_scores_are_refused_with_a_clear_message(course):
    _, steps = course
    for step, words in (("too_high", "above the maximum"), ("negative", "cannot be negative"),
                        ("not_a_number", "must be a number"), ("test_comment", "takes no comment")):
        result = steps[step]
        assert result.returncode == 2, f"{step}: {result.stdout}{result.stderr}"
        assert words in result.stderr and "nothing changed" in result.stderr, result.stderr
    assert steps["refused"]["manual"] is None and steps["refused"]["test"] == 2, "a refused score changed the gradebook"


def test_a_manual_score_and_comment_survive_autograde_force(course):
    _, steps = course
    assert steps["score"].returncode == 0, steps["score"].stderr
    assert "1.5/2" in steps["score"].stdout
    assert steps["scored"]["manual"] == 1.5 and steps["scored"]["comment"] == COMMENT
    assert steps["regrade"].returncode == 0, steps["regrade"].stdout + steps["regrade"].stderr
    after = steps["after"]["ann"]
    assert (after["manual"], after["score"], after["comment"]) == (1.5, 1.5, COMMENT)
    # nbgrader marks a manually scored cell for review again (README says so); the score stays.
    assert after["needs_manual_grade"]
    assert after["test"] == 2
    assert "1 submission(s): 1 graded" in steps["regrade"].stdout, steps["regrade"].stdout
    assert "await manual grading" not in steps["regrade"].stdout, "ann's answer has its score"


def test_a_deleted_written_answer_comes_back_empty_and_flagged(course):
    root, steps = course
    graded = nbformat.read(root / "autograde" / "autograded" / "ben" / PHASE / f"{NOTEBOOK}.ipynb", as_version=4)
    [answer] = [c for c in graded.cells if c.metadata.get("nbgrader", {}).get("grade_id") == WRITTEN]
    assert answer.source == repair.DELETED_ANSWER
    assert steps["after"]["ben"]["score"] == 0 and steps["after"]["ben"]["test"] == 2
    review = steps["export_before"]["ben"]["review"]
    assert f"written answer {WRITTEN} was deleted" in review, review


def test_stripped_metadata_does_not_turn_the_question_into_the_answer(course):
    root, steps = course
    graded = nbformat.read(root / "autograde" / "autograded" / "cat" / PHASE / f"{NOTEBOOK}.ipynb", as_version=4)
    [answer] = [c for c in graded.cells if c.metadata.get("nbgrader", {}).get("grade_id") == WRITTEN]
    assert answer.source == ANN_ANSWER
    assert "restored nbgrader metadata" in steps["export_before"]["cat"]["review"]


def feedback_text(root, student):
    page = (root / "autograde" / "feedback" / student / PHASE / f"{NOTEBOOK}.html").read_text()
    page = re.sub(r"<(style|script)[^>]*>.*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_feedback_shows_the_score_and_comment_but_no_rubric(course):
    root, steps = course
    assert steps["feedback"].returncode == 0, steps["feedback"].stdout + steps["feedback"].stderr
    text = feedback_text(root, "ann")
    assert COMMENT in text and ANN_ANSWER in text
    assert re.search(r"1\.5\s*/\s*2", text), "the manual score is not in the feedback"
    assert MODEL_ANSWER not in text and RUBRIC not in text and "Rubric" not in text


# Repair on its own, without nbgrader: the cases nbgrader's add_missing_cells gets wrong.

def _released():
    """What nbgrader releases from source_notebook(), without running it."""
    nb = source_notebook()
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade_id") == WRITTEN:
            cell.source = "YOUR ANSWER HERE"
        elif meta.get("solution"):
            cell.source = "def double(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()"
    return nb


def test_repair_puts_a_deleted_answer_after_its_question(tmp_path):
    release = _released()
    nbformat.write(release, tmp_path / "release.ipynb")
    for gone in ({WRITTEN}, {WRITTEN, "ex1_test_values", "ex1_solution"}):
        student = copy.deepcopy(release)
        student.cells = [c for c in student.cells if c.metadata.get("nbgrader", {}).get("grade_id") not in gone]
        nbformat.write(student, tmp_path / "student.ipynb")
        repairs = repair.restore_metadata(tmp_path / "student.ipynb", tmp_path / "release.ipynb")
        assert repairs == [f"written answer {WRITTEN} was deleted: restored empty, 0 points until graded by hand"]
        repaired = nbformat.read(tmp_path / "student.ipynb", as_version=4)
        nbformat.validate(repaired)
        sources = [c.source for c in repaired.cells]
        assert sources.index(repair.DELETED_ANSWER) == sources.index(QUESTION) + 1
        assert repaired.cells[sources.index(QUESTION)].metadata == {}, "the question was taken for the answer"
        assert repair.restore_metadata(tmp_path / "student.ipynb", tmp_path / "release.ipynb") == [], "idempotent"


def test_repair_survives_a_notebook_without_the_question(tmp_path):
    release = _released()
    nbformat.write(release, tmp_path / "release.ipynb")
    student = copy.deepcopy(release)
    student.cells = student.cells[:2]  # everything after the set-up cell deleted
    nbformat.write(student, tmp_path / "student.ipynb")
    assert repair.restore_metadata(tmp_path / "student.ipynb", tmp_path / "release.ipynb")
    repaired = nbformat.read(tmp_path / "student.ipynb", as_version=4)
    assert repaired.cells[-1].source == repair.DELETED_ANSWER
