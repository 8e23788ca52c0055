"""Friendly checks for the visible tests.

Each check raises an ``AssertionError`` whose message says what is wrong in
plain words, and where possible which common mistake produces exactly what
you returned ("your output equals attention without the 1/sqrt(d) scale").
When a check passes it prints nothing: call ``passed("...")`` at the end of a
test to celebrate.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def passed(message: str) -> None:
    """Print a green tick and ``message``: the last line of a visible test that passed."""
    print(f"\N{WHITE HEAVY CHECK MARK} {message}")


def check_type(value, expected_type, name: str = "output") -> None:
    """Fail if ``value`` is not an instance of ``expected_type`` (e.g. ``torch.Tensor``)."""
    if value is None:
        raise AssertionError(f"{name} is None: did you forget a `return` statement?")
    if not isinstance(value, expected_type):
        raise AssertionError(f"{name} should be a {expected_type.__name__}, "
                             f"but it is a {type(value).__name__}.")


def check_shape(tensor, expected: Sequence[int], name: str = "output") -> None:
    """Fail with a readable message if ``tensor.shape`` is not ``expected``.

    A shape with the right sizes in the wrong order is called out as a transpose.
    """
    check_type(tensor, torch.Tensor, name)
    actual, expected = tuple(tensor.shape), tuple(expected)
    if actual == expected:
        return
    message = f"{name} has shape {actual}, expected {expected}."
    if sorted(actual) == sorted(expected):
        message += " The sizes are right but in the wrong order: check for a missing or extra transpose."
    elif len(actual) != len(expected):
        message += (f" It has {len(actual)} dimensions instead of {len(expected)}:"
                    " check for a missing or extra sum, squeeze or unsqueeze.")
    raise AssertionError(message)


def check_finite(tensor, name: str = "output", hint: str = "") -> None:
    """Fail if ``tensor`` holds NaN or infinite values; ``hint`` suggests the likely cause."""
    check_type(tensor, torch.Tensor, name)
    tensor = tensor.detach()
    bad = ~torch.isfinite(tensor)
    if bad.any():
        kinds = []
        if torch.isnan(tensor).any():
            kinds.append("NaN")
        if torch.isinf(tensor).any():
            kinds.append("infinite")
        raise AssertionError(f"{name} has {int(bad.sum())} {' and '.join(kinds)} value(s) out of "
                             f"{tensor.numel()}. {hint}".rstrip())


def check_close(actual, expected, name: str = "output", *, atol: float = 1e-5, rtol: float = 1e-4,
                mistakes: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fail unless ``actual`` matches ``expected`` within the tolerances.

    ``mistakes`` maps a description of a common mistake to what that mistake
    would produce; if ``actual`` equals one of them, the message names it.
    """
    check_shape(actual, expected.shape, name)
    actual = actual.detach().to("cpu", expected.dtype)
    expected = expected.detach().to("cpu")
    if torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True):
        return
    for description, wrong in (mistakes or {}).items():
        if wrong.shape == actual.shape and torch.allclose(actual, wrong.detach().to("cpu", actual.dtype),
                                                          atol=atol, rtol=rtol, equal_nan=True):
            raise AssertionError(f"{name} is wrong in a recognisable way: it equals what you get "
                                 f"with {description}.")
    if torch.isfinite(expected).all():
        check_finite(actual, name, "The expected values are all finite.")
    diff = (actual - expected).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    share = float((diff > atol + rtol * expected.abs()).float().mean())
    raise AssertionError(f"{name} does not match the reference: {share:.0%} of the entries differ; "
                         f"the largest difference is {float(diff.max()):.3g} at index {worst} "
                         f"(you returned {float(actual[worst]):.4g}, expected {float(expected[worst]):.4g}).")


def check_distribution(probs, dim: int = -1, name: str = "weights", atol: float = 1e-5) -> None:
    """Fail unless ``probs`` is non-negative and sums to 1 along ``dim``.

    If it sums to 1 along another dimension instead, the message says the
    softmax (or normalisation) was taken over the wrong axis.
    """
    check_type(probs, torch.Tensor, name)
    probs = probs.detach()
    check_finite(probs, name, "A softmax of finite scores is always finite: is the maximum subtracted "
                              "before exponentiating?")
    if (probs < -atol).any():
        raise AssertionError(f"{name} has negative entries; probabilities are never negative.")
    sums = probs.sum(dim)
    if torch.allclose(sums, torch.ones_like(sums), atol=atol):
        return
    for other in range(probs.dim()):
        if other != dim % probs.dim():
            other_sums = probs.sum(other)
            if torch.allclose(other_sums, torch.ones_like(other_sums), atol=atol):
                raise AssertionError(f"{name} sums to 1 along dimension {other}, not along dimension "
                                     f"{dim}: the softmax is taken over the wrong axis.")
    raise AssertionError(f"{name} should sum to 1 along dimension {dim}, but the sums range from "
                         f"{float(sums.min()):.4g} to {float(sums.max()):.4g}.")


def check_gradients_flow(parameters, name: str = "the module") -> None:
    """Fail if any parameter got no gradient (or a non-finite one) after ``loss.backward()``."""
    for pname, p in parameters:
        if p.requires_grad and p.grad is None:
            raise AssertionError(f"{pname} in {name} received no gradient: is it used in forward, "
                                 "and is it registered as an nn.Parameter (or inside a sub-module)?")
        if p.grad is not None:
            check_finite(p.grad, f"the gradient of {pname}")


# ---------------------------------------------------------------------------
# Tools for tests that check how a result was computed, not only what it is
# ---------------------------------------------------------------------------

class _ForbiddenOps(TorchDispatchMode):
    """Raise as soon as an operator whose name contains one of ``fragments`` runs.

    It works below Python, where every route to a computation meets: ``torch.softmax``,
    ``F.softmax``, ``x.softmax`` and ``nn.Softmax`` all end in the same ``softmax`` operator.
    """

    def __init__(self, fragments: Sequence[str], message: str):
        super().__init__()
        self.fragments = tuple(fragments)
        self.message = message

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(fragment in name for fragment in self.fragments):
            raise AssertionError(f"{self.message} (PyTorch operator `{name}` was called)")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_ops(fragments: Sequence[str], message: str):
    """Inside this block, any PyTorch operator whose name contains one of ``fragments`` raises
    ``AssertionError(message)``: the tests of an exercise that asks you to write something
    yourself use it so that calling the built-in cannot pass."""
    with _ForbiddenOps(fragments, message):
        yield


class LargestTensor(TorchDispatchMode):
    """Record the largest block of memory that any PyTorch operator returns inside the block.

    >>> with LargestTensor() as record:
    ...     out = my_attention(q, k, v)
    >>> record.largest_bytes

    Views (transpose, slicing, expand) share the memory of the tensor they view,
    so they count with that tensor's size, never more.
    """

    def __init__(self):
        super().__init__()
        self.largest_bytes = 0
        self.largest_shape: tuple[int, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                size = tensor.untyped_storage().nbytes()
                if size > self.largest_bytes:
                    self.largest_bytes, self.largest_shape = size, tuple(tensor.shape)
        return out
