"""Helpers for the course notebooks. One module per concern, small enough to read:

* ``runtime``  -- device choice, seeding, grading detection, progress bars (every phase)
* ``checks``   -- friendly checks used by the tests, plain values and switched-off shortcuts
  (every phase)
* ``plots``    -- plotly figure helpers (every phase)
* ``attention``-- Phase 1: toy data, figures and explorers for attention
* ``transformer`` -- Phase 2: the course's reference GPT (with a KV cache and GPT-2 weight
  loading), the depth experiments, figures and explorers
* ``pretraining`` -- Phase 3: the Shakespeare corpus, a character tokenizer, the trainer, the
  shipped pretrained checkpoint, sampling helpers and figures
* ``scaling``, ``emergence`` -- Phase 4: counting parameters and FLOPs, power-law and Chinchilla
  fits, the budget game, the shipped sweep; in-context learning and induction heads in miniature
* ``sft``, ``lora`` -- Phase 5: the chat template and tokenizer, instruction tasks with exact
  answers, the shipped SFT checkpoint; the reference LoRA (Phase 8's QLoRA reuses it)
* ``rlhf``, ``preferences`` -- Phase 6: judges, preference data, reward model, PPO, DPO and GRPO
* ``distributed`` -- Phase 7: ``launch`` runs a function on N ranks with real ``torch.distributed``
  (gloo on CPU, NCCL on GPUs), and the same worker under ``torchrun``
* Phase 7: ``memory_accounting`` (per-rank memory and its peak), ``communication`` (a communication
  log, the alpha-beta cost model and its fit), ``pipeline`` (schedules: GPipe, 1F1B, interleaved,
  ZB-H1; the simulator and the real runner), ``plan3d`` (the 3D-parallelism planner);
  ``parallelism`` re-exports all four under the old name
* ``quantization``, ``inference`` -- Phase 8: number formats, quantizers, LLM.int8, GPTQ/AWQ, NF4,
  BitNet; paged KV cache, speculative decoding, distillation

A phase's module holds its figures, data and the reference building blocks that
later phases need, so that they work even when a student skipped an exercise.
The tests of an exercise that a reference here implements switch that reference off
(``checks.shortcuts_off``): calling it earns nothing.
"""

import sys as _sys

# Importing plotly imports nbformat, which imports jsonschema, which builds a grammar for an optional
# IRI format check (the `rfc3987_syntax` package) when it is installed: about 2.3 s of every notebook's
# first cell, of every grading kernel and verifier, for a check nothing here uses. jsonschema skips
# that check when the package cannot be imported; an earlier import of it is kept.
_sys.modules.setdefault("rfc3987_syntax", None)
