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


def notebooks_of(phase):
    """The notebook file names of a phase (most phases have one; Phase 8 has two)."""
    return [path.name for path in sorted((layout.SOURCE / phase).glob("*.ipynb"))]


def notebook_of(phase):
    return notebooks_of(phase)[0]


def solved(phase, name=None):
    """The released notebook with every solution cell replaced by the reference solution."""
    name = name or notebook_of(phase)
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
        for name in notebooks_of(phase):
            for student, nb in (("solver", solved(phase, name)),
                                ("starter", nbformat.read(layout.RELEASE / phase / name, as_version=4))):
                (inbox / phase / student).mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, inbox / phase / student / name)
        result = instructor(root, "collect", str(inbox / phase), "--phase", phase)
        assert result.returncode == 0, result.stdout + result.stderr
    # Seven phases, two students each, two at a time: more than the default 15 minutes on 2 cores.
    logs = {step: instructor(root, step, timeout=3000) for step in ("autograde", "feedback")}
    return root, logs


def grades(root, phase, student):
    """Every auto-graded cell's (score, max score), over all the notebooks of the phase."""
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        out = {}
        for name in notebooks_of(phase):
            nb = gb.find_submission_notebook(name.removesuffix(".ipynb"), phase, student)
            # Written answers wait for a person: only the test cells are the autograder's.
            out.update({f"{name}:{g.name}": (g.score, g.max_score) for g in nb.grades if g.cell_type == "code"})
        return out


@pytest.mark.parametrize("phase", PHASES)
def test_solution_gets_full_marks(graded, phase):
    root, logs = graded
    got = grades(root, phase, "solver")
    assert got, logs["autograde"].stdout[-3000:]
    lost = {cell: score for cell, score in got.items() if score[0] != score[1]}
    assert not lost, f"the reference solution lost points under nbgrader: {lost}\n" + logs["autograde"].stdout[-3000:]


@pytest.mark.parametrize("phase", PHASES)
def test_the_judge_decided_every_replayable_test_of_the_solution(graded, phase):
    """The judge (autograde/judge.py) replayed the reference's calls for every cell listed in
    autograde/replayable.json, outside the student's process, and passed them (full marks above)."""
    import json

    from autograde import judge

    root, logs = graded
    record = json.loads((root / "autograde" / "records" / phase / "solver.json").read_text())
    for name in notebooks_of(phase):
        assert sorted(record.get("judged", {}).get(name, [])) == sorted(judge.replayable(phase, name)), (name, record)
    assert not record["flags"], record["flags"]


@pytest.mark.parametrize("phase", PHASES)
def test_untouched_release_runs_to_the_end_and_earns_nothing(graded, phase):
    root, _ = graded
    got = grades(root, phase, "starter")
    assert got and all(score == 0 for score, _ in got.values()), got
    for name in notebooks_of(phase):
        nb = nbformat.read(root / "autograde" / "autograded" / "starter" / phase / name, as_version=4)
        assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), f"grading of {name} stopped early"


@pytest.mark.parametrize("phase", PHASES)
def test_feedback_hides_the_hidden_tests(graded, phase):
    root, logs = graded
    assert logs["feedback"].returncode == 0, logs["feedback"].stdout + logs["feedback"].stderr
    for name in notebooks_of(phase):
        source = nbformat.read(layout.SOURCE / phase / name, as_version=4)
        # compare with the cells' text, not the JSON file (where quotes are escaped)
        released = "\n".join(c.source for c in nbformat.read(layout.RELEASE / phase / name, as_version=4).cells)
        hidden = set()
        for cell in source.cells:
            for region in re.findall(r"### BEGIN HIDDEN TESTS(.*?)### END HIDDEN TESTS", cell.source, re.S):
                hidden |= {line.strip() for line in region.splitlines() if len(line.strip()) > 12}
        hidden = {line for line in hidden if line not in released}
        page = (root / "autograde" / "feedback" / "starter" / phase / name.replace(".ipynb", ".html"))
        page = re.sub(r"<(style|script)[^>]*>.*?</\1>", "", page.read_text(), flags=re.S)
        text = html.unescape(re.sub(r"<[^>]+>", "", page))
        leaked = [line for line in hidden if line in text]
        assert not leaked, f"hidden tests of {phase}/{name} leak into feedback: {leaked[:3]}"
