"""Shortcuts earn nothing, in every exercise of every phase.

Each phase's exercise tests (``tests/test_phaseNN_*exercises.py``) hold a table ``SHORTCUTS``:
for every exercise of the notebook named by the module's ``NB``, one or more solution cells that
take a shortcut (a library call, PyTorch's own version, the course's reference helper) instead of
the exercise's idea. Each must score 0 on every test cell of its exercise. Adding an exercise or a
phase means adding rows; a notebook or an exercise without rows fails here.
"""

import importlib
from pathlib import Path

import pytest

from autograde import layout

HERE = Path(__file__).parent
MODULES = {path.stem: importlib.import_module(path.stem)
           for path in sorted(HERE.glob("test_phase*_exercises.py"))}
TABLES = {name: module for name, module in MODULES.items() if hasattr(module, "NB")}


def test_every_notebook_has_a_shortcut_table_covering_every_exercise():
    covered = {}
    for name, module in TABLES.items():
        table = getattr(module, "SHORTCUTS", None)
        assert table, f"{name} has no SHORTCUTS table"
        missing = [ex for ex in module.NB.exercises() if not table.get(ex)]
        assert not missing, f"{name}: no shortcut rows for {missing}"
        unknown = sorted(set(table) - set(module.NB.exercises()))
        assert not unknown, f"{name}: SHORTCUTS names exercises the notebook does not have: {unknown}"
        covered[module.NB.path.resolve()] = name
    notebooks = {p.resolve() for p in layout.SOURCE.glob("*/*.ipynb")}
    assert notebooks <= set(covered), f"notebooks without exercise tests: {sorted(map(str, notebooks - set(covered)))}"


ROWS = [pytest.param(name, exercise, description, id=f"{name}:{exercise}:{description}")
        for name, module in TABLES.items()
        for exercise, rows in getattr(module, "SHORTCUTS", {}).items()
        for description in rows]


@pytest.mark.parametrize("module,exercise,description", ROWS)
def test_shortcut_earns_nothing(module, exercise, description):
    nb = TABLES[module].NB
    outcome = nb.run(exercise, TABLES[module].SHORTCUTS[exercise][description])
    earned = {cell: points for cell, points in outcome.earned.items() if points}
    assert not earned, f"the shortcut earned points: {earned}"
    # A row that fails for a typo or a missing library proves nothing about the guard.
    broken = {cell: error for cell, error in outcome.errors.items()
              if any(f"{kind}:" in error for kind in ("NameError", "ImportError", "ModuleNotFoundError",
                                                       "SyntaxError", "IndentationError"))}
    assert not broken, f"the shortcut row itself is broken, so it tests nothing: {broken}"
