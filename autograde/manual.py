"""Written answers, graded by hand: what awaits a person, setting a score, the export's columns.

A written answer is a markdown cell with ``grade: true, solution: true`` (README, "For
maintainers"). nbgrader's autograde gives it no automatic score, so it counts 0 until a person
grades it, in Formgrader or with ``python -m autograde score``. Re-autograding keeps manual scores
(nbgrader's SaveAutoGrades only writes ``auto_score``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from nbgrader.api import Gradebook, MissingEntry

from autograde import layout

# Columns added to the grade export, after nbgrader's own.
EXPORT_COLUMNS = ("auto_points", "auto_max", "manual_points", "manual_max", "written_ungraded")


def gradebook() -> Gradebook:
    return Gradebook(f"sqlite:///{layout.GRADEBOOK}?timeout=60")


def is_written(grade) -> bool:
    """A gradebook grade that only a person can give: the answer cell is markdown."""
    return grade.cell_type == "markdown"


def breakdown(gb: Gradebook, phase: str, student: str) -> dict:
    """Points of one submission split into automatic (test cells) and manual (written answers),
    and how many written answers have no score from a person yet."""
    totals = dict.fromkeys(EXPORT_COLUMNS, 0.0)
    totals["written_ungraded"] = 0
    for notebook in gb.find_submission(phase, student).notebooks:
        for grade in notebook.grades:
            kind = "manual" if is_written(grade) else "auto"
            totals[f"{kind}_points"] += grade.score
            totals[f"{kind}_max"] += grade.max_score
            if kind == "manual" and grade.manual_score is None:
                totals["written_ungraded"] += 1
    return totals


def ungraded(phase: str, student: str) -> int | None:
    """How many of a submission's written answers await a person (None: not in the gradebook)."""
    try:
        with gradebook() as gb:
            return breakdown(gb, phase, student)["written_ungraded"]
    except MissingEntry:
        return None


class ScoreRefused(ValueError):
    """A manual score that cannot be right; nothing was changed."""


def set_score(phase: str, student: str, cell: str, points: float, comment: str | None = None,
              notebook: str | None = None) -> str:
    """Give one answer cell of a submission a manual score (and a comment); return what was done.

    Refuses (ScoreRefused) a score below 0 or above the cell's maximum, and anything that is not a
    finite number: Formgrader's page silently clamps such input, its API stores it as is."""
    if not isinstance(points, (int, float)) or isinstance(points, bool) or not math.isfinite(points):
        raise ScoreRefused(f"the score must be a number, not {points!r}; nothing changed")
    with gradebook() as gb:
        try:
            submission = gb.find_submission(phase, student)
        except MissingEntry:
            raise ScoreRefused(f"no autograded submission of {phase} by {student!r}: run `make autograde` "
                               "first; nothing changed") from None
        names = [nb.name for nb in submission.notebooks]
        if notebook is None:
            holding = [nb.name for nb in submission.notebooks if any(g.name == cell for g in nb.grades)]
            if len(holding) != 1:
                raise ScoreRefused(f"{cell!r} is a graded cell of {len(holding)} of the notebooks {names}: "
                                   "name one with --notebook; nothing changed")
            notebook = holding[0]
        try:
            grade = gb.find_grade(cell, notebook, phase, student)
        except MissingEntry:
            raise ScoreRefused(f"{notebook} of {phase} has no graded cell {cell!r}; nothing changed") from None
        if points < 0:
            raise ScoreRefused(f"a score cannot be negative (got {points:g} for {cell}); nothing changed")
        if points > grade.max_score:
            raise ScoreRefused(f"{points:g} is above the maximum of {cell}, {grade.max_score:g} point(s); "
                               "nothing changed")
        note = ""
        if comment is not None:
            try:
                gb.find_comment(cell, notebook, phase, student).manual_comment = comment
            except MissingEntry:
                raise ScoreRefused(f"{cell} is a test cell, which takes no comment; nothing changed") from None
            note = " with a comment"
        done = f"{phase}/{student}/{notebook} {cell}: {points:g}/{grade.max_score:g} (was {grade.score:g}){note}"
        grade.manual_score = float(points)
        grade.needs_manual_grade = False
        gb.db.commit()
    return done


def annotate_export(csv_path: Path) -> None:
    """Add automatic and manual points and the count of ungraded written answers to the export."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    with gradebook() as gb:
        for row in rows:
            try:
                totals = breakdown(gb, row["assignment"], row["student_id"])
            except MissingEntry:  # not submitted, or invalid: nothing graded
                continue
            row.update({k: f"{v:g}" for k, v in totals.items()})
    with open(csv_path, "w", newline="") as f:
        fields = list(rows[0]) + [c for c in EXPORT_COLUMNS if c not in rows[0]]
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
