"""The course's files are in order: phases, clean notebooks, course/ generated from solutions/,
graded cells free of nbgrader's traps, and the two dependency lists in agreement."""

import ast
import re
import subprocess
import sys

import nbformat
import pytest

from autograde import layout, notebooks

ROOT = layout.ROOT
SOURCE_NOTEBOOKS = sorted(p for p in layout.SOURCE.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
RELEASED_NOTEBOOKS = sorted(p for p in layout.RELEASE.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def rel(path):
    return str(path.relative_to(ROOT))


def test_phase_folders_are_named_in_teaching_order():
    for top in (layout.SOURCE, layout.RELEASE):
        for folder in top.iterdir():
            assert folder.name in layout.PHASES, f"{rel(folder)} is not one of {layout.PHASES}"
    released = sorted(p.name for p in layout.RELEASE.iterdir())
    assert released == layout.available_phases(), "course/ and solutions/ hold different phases"
    assert layout.available_phases()[0] == "01_attention"


@pytest.mark.parametrize("path", SOURCE_NOTEBOOKS + RELEASED_NOTEBOOKS, ids=rel)
def test_notebooks_are_stored_clean(path):
    assert notebooks.problems(path) == [], "run `make clean-notebooks release` and commit"


def test_course_is_what_solutions_generate(tmp_path):
    """course/ must be exactly what `make release` produces from solutions/."""
    result = subprocess.run(
        [sys.executable, "-m", "nbgrader", "generate_assignment", "*", "--no-db", "--force",
         f"--CourseDirectory.release_directory={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for path in tmp_path.rglob("*.ipynb"):
        notebooks.clean_file(path)
    generated = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(layout.RELEASE): p.read_bytes() for p in layout.RELEASE.rglob("*") if p.is_file()}
    assert sorted(generated) == sorted(committed), "course/ holds other files than solutions/ generates"
    stale = [str(name) for name in generated if generated[name] != committed[name]]
    assert not stale, f"course/ is out of date for {stale}: run `make release` and commit"


def graded_cells():
    for path in SOURCE_NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade"):
                yield pytest.param(path, cell, id=f"{rel(path)}:{meta['grade_id']}")


# A written answer: a manually graded markdown cell whose whole source is one solution region that
# holds the model answer and the rubric, so nbgrader releases only its placeholder.
WRITTEN_ANSWER = re.compile(
    r"\A### BEGIN SOLUTION\n\*\*Model answer\.\*\*(\s+\S.*?)\n\n"
    r"\*\*Rubric \((\d+) points?\)\.\*\*(\s+\S.*)\n### END SOLUTION\Z", re.S)
NBGRADER_ANSWER_PLACEHOLDER = "YOUR ANSWER HERE"


def test_written_answer_pattern_is_what_the_readme_describes():
    """The pattern accepts the README's form and refuses the usual slips."""
    good = ("### BEGIN SOLUTION\n**Model answer.** Post-LN trains faster here because...\n\n"
            "**Rubric (2 points).** 1 point: names the residual path; 1 point: the measured gap.\n"
            "### END SOLUTION")
    assert WRITTEN_ANSWER.match(good)
    assert not WRITTEN_ANSWER.match(good.replace("**Rubric", "Rubric"))              # rubric unmarked
    assert not WRITTEN_ANSWER.match(good.replace("**Model answer.**", "**Answer.**"))  # no model answer
    assert not WRITTEN_ANSWER.match("Intro\n" + good)                                 # text outside the region
    assert not WRITTEN_ANSWER.match(good + "\nafter")
    assert not WRITTEN_ANSWER.match(good.replace("(2 points)", "(two points)"))       # points not a number


@pytest.mark.parametrize("path,cell", list(graded_cells()))
def test_grade_cells_avoid_nbgraders_traps(path, cell):
    meta = cell.metadata["nbgrader"]
    if cell.cell_type == "markdown":
        # Graded by hand in Formgrader; the autograder leaves it to people.
        assert meta["grade_id"].startswith("written_"), "a written answer's grade_id is written_<topic>"
        assert meta.get("solution") is True, "a written answer is a solution cell, or students cannot answer"
        assert not meta.get("locked"), "a locked answer cell cannot be written in"
        assert isinstance(meta.get("points"), int) and meta["points"] > 0
        match = WRITTEN_ANSWER.match(cell.source)
        assert cell.source.count("### BEGIN SOLUTION") == cell.source.count("### END SOLUTION") == 1
        assert match, (f"{meta['grade_id']}: the source must be exactly one solution region holding "
                       "'**Model answer.** ...' then '**Rubric (N points).** ...' (README, For maintainers)")
        assert int(match.group(2)) == meta["points"], (
            f"{meta['grade_id']}: the rubric says {match.group(2)} points, the cell is worth {meta['points']}")
        return
    assert cell.cell_type == "code", f"a {cell.cell_type} cell cannot be graded"
    assert meta.get("locked"), "a test cell must be locked, or students can edit it"
    assert isinstance(meta.get("points"), int) and meta["points"] > 0
    assert "raises-exception" not in cell.metadata.get("tags", []), "a failing test would pass"
    # A cell whose last line is a non-numeric expression gets full credit whatever it evaluates to.
    body = ast.parse(cell.source).body
    last = body[-1]
    assert not isinstance(last, ast.Expr) or isinstance(last.value, ast.Call), (
        f"the last statement of {meta['grade_id']} is a bare expression: use `assert`")
    assert cell.source.count("### BEGIN HIDDEN TESTS") == cell.source.count("### END HIDDEN TESTS") <= 1
    hidden = re.search(r"### BEGIN HIDDEN TESTS(.*)### END HIDDEN TESTS", cell.source, re.S)
    assert hidden, f"{meta['grade_id']} has no hidden tests: the visible test alone would decide the grade"
    assert "print(" not in hidden.group(1), "hidden tests must not print (the output reaches feedback)"


@pytest.mark.parametrize("path", SOURCE_NOTEBOOKS, ids=rel)
def test_every_exercise_has_a_solution_and_tests(path):
    nb = nbformat.read(path, as_version=4)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert ids and ids[0] == "setup", "the first nbgrader cell is the locked set-up cell"
    exercises = [i.removesuffix("_solution") for i in ids if i.endswith("_solution")]
    assert exercises, "a phase without graded exercises"
    for exercise in exercises:
        solution = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == f"{exercise}_solution")
        assert "### BEGIN SOLUTION" in solution.source and "### END SOLUTION" in solution.source
        assert any(i.startswith(f"{exercise}_test") for i in ids), f"{exercise} has no test cell"


def written_answer_cells():
    for path in SOURCE_NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for index, cell in enumerate(nb.cells):
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("grade") and cell.cell_type == "markdown":
                yield pytest.param(path, index, id=f"{rel(path)}:{meta['grade_id']}")


@pytest.mark.parametrize("path,index", list(written_answer_cells()))
def test_written_answers_reach_students_as_nbgraders_placeholder(path, index):
    """Neither the model answer nor the rubric is released; a question precedes each answer."""
    source = nbformat.read(path, as_version=4)
    cell = source.cells[index]
    grade_id = cell.metadata["nbgrader"]["grade_id"]
    question = source.cells[index - 1]
    assert index > 0 and question.cell_type == "markdown" and not question.metadata.get("nbgrader", {}).get(
        "grade"), f"{grade_id}: the question, an ungraded markdown cell, comes just before the answer"
    released_path = layout.RELEASE / path.relative_to(layout.SOURCE)
    stale = f"run `make release PHASE={path.parent.name}`"
    assert released_path.exists(), f"{rel(released_path)} does not exist: {stale}"
    released = nbformat.read(released_path, as_version=4)
    answers = [c for c in released.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id]
    assert len(answers) == 1, f"{grade_id} is missing from {rel(released_path)}: {stale}"
    assert answers[0].source == NBGRADER_ANSWER_PLACEHOLDER
    model, _, rubric = WRITTEN_ANSWER.match(cell.source).groups()
    text = "\n".join(c.source for c in released.cells)
    for part in (model, rubric):
        assert part.strip()[:200] not in text, f"{grade_id}: the model answer or rubric reached course/"


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    declared = re.findall(r'"([^"]+)"', block.group(1))
    listed = re.findall(r'^\s+- "([^"]+)"$', (ROOT / "environment.yml").read_text(), re.M)
    assert sorted(d for d in listed if d != "-e .") == sorted(declared)
