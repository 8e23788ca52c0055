"""Every phase through the real instructor commands: its solution notebook gets full marks, its
untouched release runs to the end and gets nothing, and its feedback hides the hidden tests.

Phase 1 has the full round trip (tests/test_autograde_roundtrip.py); this file grades the later
phases in one batch, two students each, so a phase whose hidden tests break under nbgrader (stderr,
a missing import, a cell that needs another exercise) fails here.
"""

import html
import re

import nbformat
import pytest
from nbgrader.api import Gradebook

from autograde import layout
from notebook_harness import SourceNotebook
from test_autograde_roundtrip import course_copy, instructor

PHASES = [p for p in layout.available_phases() if p != "01_attention"]


def notebook_of(phase):
    [path] = sorted((layout.SOURCE / phase).glob("*.ipynb"))
    return path.name


def solved(phase):
    """The released notebook with every solution cell replaced by the reference solution."""
    name = notebook_of(phase)
    source = SourceNotebook(f"solutions/{phase}/{name}")
    nb = nbformat.read(layout.RELEASE / phase / name, as_version=4)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id", "")
        if gid.endswith("_solution"):
            cell.source = source.solution_source(gid.removesuffix("_solution"))
    return nb


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = course_copy(tmp_path_factory.mktemp("phases"))
    inbox = root.parent / "inbox"
    for phase in PHASES:
        name = notebook_of(phase)
        for student, nb in (("solver", solved(phase)),
                            ("starter", nbformat.read(layout.RELEASE / phase / name, as_version=4))):
            (inbox / phase / student).mkdir(parents=True)
            nbformat.write(nb, inbox / phase / student / name)
        result = instructor(root, "collect", str(inbox / phase), "--phase", phase)
        assert result.returncode == 0, result.stdout + result.stderr
    logs = {step: instructor(root, step) for step in ("autograde", "feedback")}
    return root, logs


def grades(root, phase, student):
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        nb = gb.find_submission_notebook(notebook_of(phase).removesuffix(".ipynb"), phase, student)
        return {g.name: (g.score, g.max_score) for g in nb.grades}


@pytest.mark.parametrize("phase", PHASES)
def test_solution_gets_full_marks(graded, phase):
    root, logs = graded
    got = grades(root, phase, "solver")
    assert got, logs["autograde"].stdout[-3000:]
    lost = {cell: score for cell, score in got.items() if score[0] != score[1]}
    assert not lost, f"the reference solution lost points under nbgrader: {lost}\n" + logs["autograde"].stdout[-3000:]


@pytest.mark.parametrize("phase", PHASES)
def test_untouched_release_runs_to_the_end_and_earns_nothing(graded, phase):
    root, _ = graded
    got = grades(root, phase, "starter")
    assert got and all(score == 0 for score, _ in got.values()), got
    nb = nbformat.read(root / "autograde" / "autograded" / "starter" / phase / notebook_of(phase), as_version=4)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "grading stopped early"


@pytest.mark.parametrize("phase", PHASES)
def test_feedback_hides_the_hidden_tests(graded, phase):
    root, logs = graded
    assert logs["feedback"].returncode == 0, logs["feedback"].stdout + logs["feedback"].stderr
    source = nbformat.read(layout.SOURCE / phase / notebook_of(phase), as_version=4)
    released = nbformat.writes(nbformat.read(layout.RELEASE / phase / notebook_of(phase), as_version=4))
    hidden = set()
    for cell in source.cells:
        for region in re.findall(r"### BEGIN HIDDEN TESTS(.*?)### END HIDDEN TESTS", cell.source, re.S):
            hidden |= {line.strip() for line in region.splitlines() if len(line.strip()) > 12}
    hidden = {line for line in hidden if line not in released}
    page = (root / "autograde" / "feedback" / "starter" / phase / notebook_of(phase).replace(".ipynb", ".html"))
    page = re.sub(r"<(style|script)[^>]*>.*?</\1>", "", page.read_text(), flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    leaked = [line for line in hidden if line in text]
    assert not leaked, f"hidden tests of {phase} leak into feedback: {leaked[:3]}"
