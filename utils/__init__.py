"""Helpers for the course notebooks. One module per concern, small enough to read:

* ``runtime``  -- device choice, seeding, grading detection, progress bars (every phase)
* ``checks``   -- friendly checks used by the visible tests (every phase)
* ``plots``    -- plotly figure helpers (every phase)
* ``attention``-- Phase 1: toy data, figures and explorers for attention

A phase's module holds its figures, data and reference building blocks for
later phases, never the solution of one of its own graded exercises.
"""
