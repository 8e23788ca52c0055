"""Instructor tooling: release, collect, autograde, feedback and grade export, on top of nbgrader.

Run ``python -m autograde --help`` from the repository root.
"""
