"""Helpers for the course notebooks. One module per concern, small enough to read:

* ``runtime``  -- device choice, seeding, grading detection, progress bars (every phase)
* ``checks``   -- friendly checks used by the visible tests (every phase)
* ``plots``    -- plotly figure helpers (every phase)
* ``attention``-- Phase 1: toy data, figures and explorers for attention
* ``transformer`` -- Phase 2: the course's reference GPT (with a KV cache and GPT-2 weight
  loading), the depth experiments, figures and explorers
* ``pretraining`` -- Phase 3: the Shakespeare corpus, a character tokenizer, the trainer, the
  shipped pretrained checkpoint, sampling helpers and figures
* ``distributed`` -- Phase 7: ``launch`` runs a function on N ranks with real ``torch.distributed``
  (gloo on CPU, NCCL on GPUs), and the same worker under ``torchrun``
* ``parallelism`` -- Phase 7: per-rank memory accounting, a communication log with an alpha-beta
  cost model, the pipeline schedule simulator and the 3D-parallelism planner

A phase's module holds its figures, data and the reference building blocks that
later phases need, so that they work even when a student skipped an exercise.
Only ``transformer.GPT`` overlaps a graded exercise (Phase 2's exercise 5): its
tests check that the student's own classes do the work, so aliasing it earns nothing.
"""
