import pytest
import torch

from utils import checks


def fails_with(fragment, func, *args, **kwargs):
    with pytest.raises(AssertionError) as error:
        func(*args, **kwargs)
    assert fragment in str(error.value), str(error.value)


def test_missing_return_is_named():
    fails_with("forget a `return`", checks.check_shape, None, (2, 3))


def test_wrong_type_and_shapes_are_explained():
    fails_with("should be a Tensor", checks.check_shape, [1, 2], (2,))
    fails_with("wrong order", checks.check_shape, torch.zeros(3, 2), (2, 3))
    fails_with("3 dimensions instead of 2", checks.check_shape, torch.zeros(1, 2, 3), (2, 3))
    checks.check_shape(torch.zeros(2, 3), (2, 3))


def test_non_finite_values_are_counted():
    t = torch.tensor([1.0, float("nan"), float("inf")])
    fails_with("2 NaN and infinite value(s) out of 3. Try this", checks.check_finite, t, "x", "Try this")
    checks.check_finite(torch.ones(3))


def test_close_passes_within_tolerance_and_locates_the_worst_entry():
    expected = torch.arange(6.0).reshape(2, 3)
    checks.check_close(expected + 1e-7, expected)
    wrong = expected.clone()
    wrong[1, 2] = 100.0
    fails_with("at index (1, 2)", checks.check_close, wrong, expected)
    fails_with("17% of the entries", checks.check_close, wrong, expected)


def test_close_recognises_a_named_mistake():
    expected = torch.ones(4)
    fails_with("equals what you get with no scaling", checks.check_close, 2 * expected, expected,
               mistakes={"no scaling": 2 * expected, "something else": 3 * expected})


def test_close_flags_nans_when_the_reference_has_none():
    fails_with("NaN", checks.check_close, torch.tensor([float("nan"), 1.0]), torch.ones(2))


def test_distribution_names_the_wrong_axis():
    probs = torch.softmax(torch.randn(4, 4), dim=0)
    fails_with("wrong axis", checks.check_distribution, probs, dim=-1)
    checks.check_distribution(torch.softmax(torch.randn(4, 4), dim=-1), dim=-1)
    fails_with("negative", checks.check_distribution, torch.tensor([1.5, -0.5]))
    fails_with("sums range", checks.check_distribution, torch.tensor([[0.2, 0.2], [0.3, 0.3]]))


def test_gradients_flow_names_the_parameter_without_gradient():
    layer, unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"used": layer, "unused": unused})
    layer(torch.ones(1, 2)).sum().backward()
    fails_with("unused.weight", checks.check_gradients_flow, model.named_parameters())
    checks.check_gradients_flow(layer.named_parameters())


def test_passed_prints_a_tick(capsys):
    checks.passed("all good")
    assert "all good" in capsys.readouterr().out


# --- plain values and switched-off shortcuts (what every exercise's tests rely on) ---------------

import functools  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class _LyingTensor(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return True  # every comparison "succeeds"


class _LyingFloat(float):
    def __eq__(self, other):
        return True

    def __le__(self, other):
        return True


def test_plain_turns_liars_into_their_values():
    tensor = torch.zeros(3).as_subclass(_LyingTensor)
    value = checks.plain(tensor)
    assert type(value) is torch.Tensor and torch.equal(value, torch.zeros(3))
    with pytest.raises(AssertionError):
        checks.check_close(tensor, torch.ones(3))
    assert type(checks.plain(_LyingFloat(2.0))) is float and checks.plain(_LyingFloat(2.0)) != 3.0
    nested = checks.plain({"a": [_LyingFloat(1.0), (True, "s")]})
    assert nested == {"a": [1.0, (True, "s")]} and type(nested["a"][0]) is float
    parameter = torch.nn.Parameter(torch.ones(2))
    assert checks.plain(parameter) is parameter, "an honest tensor is passed through as it is"


def test_plain_keeps_the_autograd_graph():
    x = torch.ones(2, requires_grad=True)
    out = checks.plain((x * 3).as_subclass(_LyingTensor))
    torch.Tensor.sum(out).backward()
    assert torch.equal(x.grad, torch.full((2,), 3.0))


def _clip(parameters):
    return torch.nn.utils.clip_grad_norm_(parameters, 1.0)


SAVED_CLIP = torch.nn.utils.clip_grad_norm_


@pytest.mark.parametrize("route", ["direct", "saved", "partial", "swallowed"])
def test_shortcuts_off_catches_every_route_to_a_function(route):
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.ones(3)

    def student():
        if route == "direct":
            return _clip([parameter])
        if route == "saved":
            return SAVED_CLIP([parameter], 1.0)
        if route == "partial":
            return functools.partial(SAVED_CLIP, [parameter])(1.0)
        try:
            _clip([parameter])
        except AssertionError:
            pass
        return parameter.grad.norm()

    with pytest.raises(AssertionError, match="write clipping yourself"):
        with checks.shortcuts_off("torch.nn.utils.clip_grad_norm_", message="write clipping yourself"):
            student()


def test_shortcuts_off_catches_builtins_packages_and_operators():
    q = torch.randn(1, 2, 4)
    with pytest.raises(AssertionError, match="scaled_dot_product_attention"):
        with checks.shortcuts_off(F.scaled_dot_product_attention, message="m"):
            torch._C._nn.scaled_dot_product_attention(q, q, q)
    with pytest.raises(AssertionError, match="operator"):
        with checks.shortcuts_off(ops=["softmax"], message="m"):
            torch.randn(3).softmax(0)
    import transformers
    warper = transformers.TopKLogitsWarper(2)
    with pytest.raises(AssertionError, match="transformers"):
        with checks.shortcuts_off("transformers.*", message="m"):
            warper(None, torch.randn(1, 5))


def test_the_checks_cannot_be_switched_off_from_inside():
    from torch.utils._python_dispatch import _disable_current_modes
    with pytest.raises(AssertionError):
        with checks.forbid_ops(["softmax"], "m"):
            with _disable_current_modes():
                torch.randn(3).softmax(0)
    with pytest.raises(AssertionError):
        with checks.shortcuts_off(SAVED_CLIP, message="m"):
            functools.partial(sys.setprofile, None)()
    with pytest.raises(AssertionError):
        with checks.LargestTensor():
            with _disable_current_modes():
                torch.zeros(1000)
    assert sys.getprofile() is None


def test_honest_code_runs_unhindered_under_shortcuts_off():
    with checks.shortcuts_off(SAVED_CLIP, "tokenizers.*", ops=["softmax"], message="m"):
        x = torch.randn(4, 4)
        y = (x.exp() / x.exp().sum(-1, keepdim=True)) @ x
    assert y.shape == (4, 4) and sys.getprofile() is None
