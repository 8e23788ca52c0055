"""Phase 5 (and Phase 8) helpers: low-rank adapters (LoRA, Hu et al. 2021), the reference version.

LoRA freezes a pretrained weight W (d_out x d_in) and learns a low-rank update next to it:

    y = W x + b + (alpha / r) * B (A x),   A: (r, d_in), B: (d_out, r), B = 0 at the start,

so the adapted model starts exactly where the pretrained one is, and trains r * (d_in + d_out)
numbers per layer instead of d_in * d_out. ``merge()`` folds the update into W (no extra cost at
inference), ``unmerge()`` takes it out again. The parameter names (``lora_A``, ``lora_B``) and the
initialisation (A Kaiming-uniform, B zero) are those of Hugging Face ``peft``, so the outputs of the
two can be compared weight for weight (``peft_twin``).

Public API (Phases 5, 6 and 8 rely on it; it stays stable):

* ``LoRALinear(base, r, alpha, dropout=0.0)`` -- wraps an ``nn.Linear`` (or any module with
  ``in_features``, ``out_features`` and a forward, such as Phase 8's quantized linear: QLoRA);
  ``.merge()``, ``.unmerge()``, ``.merged``, ``.scaling``, ``.delta_weight()``
* ``add_lora(model, r, alpha, targets)`` -- replace every ``nn.Linear`` whose name ends with one of
  ``targets`` by a ``LoRALinear`` (in place), then ``mark_only_lora_trainable``; returns ``model``
* ``mark_only_lora_trainable(model)`` -- ``requires_grad`` on the adapters' parameters only
* ``lora_layers(model)``, ``merge_lora(model)``, ``unmerge_lora(model)``, ``remove_lora(model)``
* ``train_new_token_rows(model, first_new_id)`` -- the rows of added tokens train, the rest stays frozen
* ``count_trainable(model)`` -- (trainable, total) parameter counts
* ``peft_twin(model, r, alpha, targets)`` -- a copy of the *un-adapted* base inside ``peft``, holding
  the same adapter weights as a model that went through ``add_lora`` (the cross-check)
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")   # every linear layer of a course GPT block


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * (dropout(x) @ A.T @ B.T)`` with ``base`` frozen.

    ``A`` (``lora_A``, shape (r, in_features)) starts Kaiming-uniform, ``B`` (``lora_B``, shape
    (out_features, r)) starts at zero: at initialisation the layer computes exactly ``base(x)``.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError("the rank r must be positive")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = getattr(base, "weight", None)
        kwargs = {"device": weight.device, "dtype": weight.dtype} if isinstance(weight, torch.Tensor) and \
            weight.is_floating_point() else {}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # peft's (and nn.Linear's) default
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / r) * B @ A`` (out_features, in_features) that ``merge`` adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    # (`with torch.no_grad()` inside rather than the decorator: the decorator's wrapper is one shared
    # function, which the graded tests' call watcher could not tell apart from a student's.)
    def merge(self) -> None:
        """W <- W + (alpha / r) B A: the layer becomes one plain matrix multiply."""
        if not self.merged:
            with torch.no_grad():
                self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        """W <- W - (alpha / r) B A: back to the frozen base plus a separate adapter."""
        if self.merged:
            with torch.no_grad():
                self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        # Two thin matrix multiplies (x A^T, then B^T): never the full d_out x d_in update.
        return out + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _named_linears(model: nn.Module, targets: Sequence[str]):
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            yield name, module


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets: Iterable[str] = DEFAULT_TARGETS,
             dropout: float = 0.0) -> nn.Module:
    """Wrap every ``nn.Linear`` whose attribute name is in ``targets`` (e.g. ``"c_attn"``) in a
    ``LoRALinear``, in place; then only the adapters are trainable. Returns ``model``."""
    targets = tuple(targets)
    found = list(_named_linears(model, targets))
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in the model")
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r, alpha, dropout))
    mark_only_lora_trainable(model)
    return model


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """``requires_grad`` True for the ``lora_A``/``lora_B`` parameters, False for every other one."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[-1] in ("lora_A", "lora_B"))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each ``LoRALinear`` by its base layer (with the update merged in if ``merge``)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if merge:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def train_new_token_rows(model: nn.Module, first_new_id: int) -> nn.Module:
    """Let the embedding rows of the tokens added to the vocabulary (ids ``first_new_id`` and up) train
    while every other row stays frozen -- what peft's ``trainable_token_indices`` and
    ``modules_to_save`` are for. Without it, LoRA freezes the chat tokens at their shared starting row
    (``utils.sft.resize_token_embeddings`` starts them all at the mean): they keep identical logits
    under the tied head, so the model cannot prefer ``<|end|>`` to ``<|user|>`` and never stops.
    A gradient hook zeroes the old rows' gradients (the optimizer must not use weight decay on them:
    the course's ``SFTConfig`` has none). Returns ``model``."""
    weight = model.transformer.wte.weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[first_new_id:] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * mask)
    weight.trainable_rows = weight.shape[0] - first_new_id   # read by count_trainable
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), shared tensors counted once; of an embedding that went
    through ``train_new_token_rows`` only the new rows count as trainable."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            rows = getattr(p, "trainable_rows", None)
            trainable += p.numel() if rows is None else rows * p[0].numel()
    return trainable, total


def peft_twin(adapted: nn.Module, r: int, alpha: float, targets: Iterable[str] = DEFAULT_TARGETS):
    """The same adapted model built by Hugging Face ``peft``: a copy of ``adapted``'s base weights
    with ``peft``'s LoRA injected into the same layers, and our ``lora_A``/``lora_B`` copied in.

    ``adapted`` went through ``add_lora`` (unmerged). Its outputs and the twin's must agree.
    """
    from peft import LoraConfig, inject_adapter_in_model

    base = remove_lora(copy.deepcopy(adapted), merge=False)
    for layer in lora_layers(adapted):
        if layer.merged:
            raise ValueError("unmerge the adapters first")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    twin = inject_adapter_in_model(config, base)
    ours = {name: m for name, m in adapted.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        for name, layer in ours.items():
            theirs = twin.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return twin.eval()
