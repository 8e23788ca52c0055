"""Feedback made from verdicts, never from the grading run's output.

nbgrader's default feedback shows each graded cell as it was run, hidden tests included, both as
source and inside tracebacks, and every output the student's code printed while the hidden tests
called it. This preprocessor rebuilds what the student sees instead:

* a test cell shows its released (visible) source and one line: passed, or failed with the
  message its visible test gave when the student's notebook was re-run with the released tests
  only (``verify.py``'s visible run; no hidden test ever reached that process), or a fixed
  sentence when only the hidden tests failed;
* every other code cell loses its outputs (they may have been produced while hidden tests ran);
* markdown, including written answers and the grader's comments, is untouched.

Pass or fail comes from the gradebook's final score (nbgrader's, lowered by the verifier,
or the instructor's manual score).
"""

from __future__ import annotations

import json

import nbformat
from nbformat.v4 import new_output
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.preprocessors import NbGraderPreprocessor
from nbgrader.utils import is_grade

from autograde import layout
from autograde.cells import split_test


class FeedbackFromVerdicts(NbGraderPreprocessor):
    """Replace an autograded notebook's test cells and outputs by what the verdicts allow."""

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        phase, student, notebook = info["assignment"], info["student"], info["notebook"]
        released = layout.RELEASE / phase / f"{notebook}.ipynb"
        visible = {}
        if released.exists():
            visible = {c.metadata["nbgrader"]["grade_id"]: c.source
                       for c in nbformat.read(released, as_version=4).cells
                       if c.metadata.get("nbgrader", {}).get("grade_id")}
        messages = {}
        record = layout.STATE / "records" / phase / f"{student}.json"
        if record.exists():
            messages = json.loads(record.read_text()).get("feedback", {}).get(f"{notebook}.ipynb", {})
        with Gradebook(info["db_url"]) as gradebook:
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                if not is_grade(cell):
                    cell.outputs = []
                    continue
                gid = cell.metadata["nbgrader"]["grade_id"]
                cell.source = visible.get(gid, split_test(cell.source)[0])
                try:
                    grade = gradebook.find_grade(gid, notebook, phase, student)
                    score, most = grade.score, grade.max_score
                except MissingEntry:
                    score, most = 0.0, None
                cell.outputs = [self._line(score, most, messages.get(gid, {}).get("message", ""))]
        return nb, resources

    @staticmethod
    def _line(score, most, message: str):
        if most is not None and score is not None and score >= most:
            text = f"\N{WHITE HEAVY CHECK MARK} Passed ({score:g} of {most:g} points).\n"
        else:
            text = "\N{CROSS MARK} This test did not pass."
            if most is not None:
                text += f" ({score or 0:g} of {most:g} points.)"
            text += f" {message}\n" if message else "\n"
        return new_output("stream", name="stdout", text=text)
