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
