"""The parts of a graded test cell, and student cells as IPython would run them.

A test cell is its visible part (what the released notebook shows) followed by the hidden tests
between ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``. The verifier runs the visible part
in the notebook's namespace and the hidden part in a copy of it, so nothing the hidden tests define
(references, helpers) is within reach of the student's functions. The mutation tests
(tests/notebook_harness.py) run cells the same way.
"""

from __future__ import annotations

import re

BEGIN, END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
_HIDDEN = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS[^\n]*\n?(.*?)^[ \t]*### END HIDDEN TESTS[^\n]*\n?", re.S | re.M)


def split_test(source: str) -> tuple[str, str]:
    """``(visible, hidden)``: the test cell without its hidden region, and the hidden region's code.
    Code after the hidden region (rare) belongs to the hidden part, since it runs after it."""
    match = _HIDDEN.search(source)
    if not match:
        return source, ""
    return source[:match.start()], match.group(1) + source[match.end():]


def as_python(source: str) -> str:
    """A cell's source as IPython runs it: ``%time``, ``!ls`` and ``x?`` become plain Python calls
    on ``get_ipython()``, with IPython's own transformer (what JupyterLab's kernel does)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:
        return source
    try:
        return TransformerManager().transform_cell(source)
    except Exception:  # IPython could not read it: Python will say why
        return source
