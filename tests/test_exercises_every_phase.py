"""Two promises every graded exercise of every phase keeps: the reference solution earns full marks,
and the stub that nbgrader releases earns nothing. (Each phase's own test file proves the rest: correct
solutions written differently pass, common mistakes lose points.)"""

import pytest

from autograde import layout
from notebook_harness import SourceNotebook, stub

# Keyed "phase/notebook": a phase may have several notebooks (Phase 8 has two).
NOTEBOOKS = {f"{path.parent.name}/{path.stem}": SourceNotebook(str(path.relative_to(layout.ROOT)))
             for path in sorted(layout.SOURCE.glob("*/*.ipynb"))}
EXERCISES = [(phase, exercise) for phase, nb in NOTEBOOKS.items() for exercise in nb.exercises()]


@pytest.mark.parametrize("phase,exercise", EXERCISES)
def test_reference_solution_gets_full_marks(phase, exercise):
    outcome = NOTEBOOKS[phase].run(exercise)
    assert outcome.full_marks, outcome.errors


@pytest.mark.parametrize("phase,exercise", EXERCISES)
def test_unimplemented_stub_earns_nothing(phase, exercise):
    source = stub(NOTEBOOKS[phase].solution_source(exercise))
    assert "raise NotImplementedError()" in source and "### BEGIN SOLUTION" not in source
    outcome = NOTEBOOKS[phase].run(exercise, source)
    assert sum(outcome.earned.values()) == 0, outcome.earned
