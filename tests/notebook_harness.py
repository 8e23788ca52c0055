"""Run one graded exercise of a source notebook in-process, with any implementation.

The mutation tests use this to prove that the hidden tests of an exercise
fail common mistakes and pass correct solutions written differently, without
starting a kernel. Conventions it relies on (every phase follows them):

* the notebook's set-up cell has nbgrader ``grade_id`` ``setup``;
* an exercise ``exN`` has one solution cell ``exN_solution`` and one or more
  graded test cells whose ``grade_id`` starts with ``exN_test``;
* a test cell needs only the set-up cell and its exercise's solution cell;
* as under the verifier (autograde/verify_harness.py), a test cell's hidden part runs in a copy of
  the namespace, so what it defines never reaches the student's code.
"""

from __future__ import annotations

import contextlib
import io
import re
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograde.cells import split_test
from utils.checks import plain_results

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    """Points earned per test cell, and the failure message of each failed cell."""

    earned: dict[str, float] = field(default_factory=dict)
    possible: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def full_marks(self) -> bool:
        return self.earned == self.possible

    @property
    def lost_points(self) -> bool:
        return sum(self.earned.values()) < sum(self.possible.values())

    @property
    def messages(self) -> str:
        """Every failed cell's traceback, as one text to search for a message."""
        return "\n".join(self.errors.values())


def stub(source: str) -> str:
    """A solution cell as nbgrader releases it: each solution region becomes `raise NotImplementedError()`."""
    return re.sub(r"^( *)### BEGIN SOLUTION\n.*?### END SOLUTION\n?",
                  lambda m: f"{m.group(1)}# YOUR CODE HERE\n{m.group(1)}raise NotImplementedError()\n",
                  source, flags=re.S | re.M)


class SourceNotebook:
    """A notebook in ``solutions/``, read once, whose exercises can be re-run."""

    def __init__(self, relative_path: str):
        self.path = ROOT / relative_path
        self.nb = nbformat.read(self.path, as_version=4)
        self.cells = {c.metadata["nbgrader"]["grade_id"]: c for c in self.nb.cells
                      if "nbgrader" in c.metadata and "grade_id" in c.metadata["nbgrader"]}

    def exercises(self) -> list[str]:
        return [gid.removesuffix("_solution") for gid in self.cells if gid.endswith("_solution")]

    def tests_of(self, exercise: str) -> list[str]:
        return [gid for gid, c in self.cells.items()
                if gid.startswith(f"{exercise}_test") and c.metadata["nbgrader"].get("grade")]

    def solution_source(self, exercise: str) -> str:
        return self.cells[f"{exercise}_solution"].source

    def mutate(self, exercise: str, *replacements: tuple[str, str]) -> str:
        """The reference solution of ``exercise`` with each ``(old, new)`` applied; each ``old`` must
        occur, so a mutation test cannot silently stop mutating when the solution is edited."""
        source = self.solution_source(exercise)
        for old, new in replacements:
            assert old in source, f"the reference solution of {exercise} changed: update this mutation ({old!r})"
            source = source.replace(old, new)
        return source

    def run(self, exercise: str, solution_source: str | None = None) -> Outcome:
        """Run the set-up cell, ``solution_source`` (default: the reference solution)
        and every test cell of ``exercise``, hidden tests included."""
        namespace: dict = {"__name__": "__main__"}
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            exec(compile(self.cells["setup"].source, "setup", "exec"), namespace)
            source = self.solution_source(exercise) if solution_source is None else solution_source
            exec(compile(source, f"{exercise}_solution", "exec"), namespace)
        outcome = Outcome()
        for gid in self.tests_of(exercise):
            points = float(self.cells[gid].metadata["nbgrader"]["points"])
            outcome.possible[gid] = points
            try:
                visible, hidden = split_test(self.cells[gid].source)
                with contextlib.redirect_stdout(sink):
                    exec(compile(visible, gid, "exec"), namespace)
                    exec(compile(hidden, f"{gid} (hidden)", "exec"), self._hidden_namespace(namespace))
                outcome.earned[gid] = points
            except Exception:  # a failing test cell, as nbgrader would see it
                outcome.earned[gid] = 0.0
                outcome.errors[gid] = traceback.format_exc(limit=-3)
        return outcome

    @staticmethod
    def _hidden_namespace(namespace: dict) -> dict:
        """What a test cell's hidden part sees, as under the verifier: a copy of the namespace in which
        the solution cell's functions hand back plain values."""
        copy = dict(namespace)
        for name, value in namespace.items():
            if isinstance(value, types.FunctionType) and value.__code__.co_filename.endswith("_solution"):
                copy[name] = plain_results(value)
        return copy

    def assert_full_marks(self, exercise: str, source: str) -> None:
        """``source`` (a correct solution written another way) must earn every point."""
        outcome = self.run(exercise, source)
        assert outcome.full_marks, outcome.errors

    def assert_loses_points(self, exercise: str, source: str, message: str | None = None,
                            cell: str | None = None) -> Outcome:
        """``source`` (a realistic mistake) must lose points: all of test cell ``cell`` if given,
        with ``message`` among the failures if given."""
        outcome = self.run(exercise, source)
        assert outcome.lost_points, f"this mistake got full marks: {outcome.earned}"
        if cell:
            assert outcome.earned[cell] == 0, outcome.earned
        if message:
            assert message in outcome.messages, outcome.messages[-3000:]
        return outcome
