"""Instructor tooling: release, collect, autograde, feedback and grade export, on top of nbgrader.

Run ``python -m autograde --help`` from the repository root.
"""

import utils  # noqa: F401  (its import skips a 2 s grammar build that nbformat would trigger: see utils/__init__.py)
