"""Feedback that teaches without leaking the hidden tests.

nbgrader's default feedback shows each graded cell as it was run, hidden tests
included, both as source and inside tracebacks. This preprocessor removes the
hidden region from every cell and replaces each traceback with the exception's
name and message, which is what the visible checks write for students.
"""

from nbformat.v4 import new_output
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor
from nbgrader.utils import is_grade


class HideHiddenTests(NbGraderPreprocessor):
    """Strip hidden tests and tracebacks from an autograded notebook before it becomes feedback."""

    def preprocess(self, nb, resources):
        self._clear = ClearHiddenTests(enforce_metadata=False)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, resources
        self._clear._remove_hidden_test_region(cell)
        if is_grade(cell):
            cell.outputs = [self._summary(o) if o.output_type == "error" else o for o in cell.outputs]
        return cell, resources

    @staticmethod
    def _summary(error):
        message = f"{error.ename}: {error.evalue}" if error.evalue else error.ename
        return new_output("stream", name="stdout", text=f"\N{CROSS MARK} This test did not pass. {message}\n")
