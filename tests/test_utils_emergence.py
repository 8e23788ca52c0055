"""utils.emergence's data-order experiment (Phase 4, section 8): the orders hold the same examples,
the losses are measured above a floor no model can beat, and a small run reports what it should."""

import math

import torch

from utils import emergence, scaling


def test_the_three_orders_hold_the_same_examples():
    g = torch.Generator().manual_seed(0)
    orders = emergence.data_orders(n_high=90, n_low=10, first=0.5, generator=g)
    assert set(orders) == {"mixed", "high first, then mixed", "high, then low"}
    for order in orders.values():
        assert torch.equal(order.sort().values, torch.arange(100))
    assert bool((orders["high first, then mixed"][:50] < 90).all())       # the first half: high-resource only
    assert bool((orders["high first, then mixed"][50:] >= 90).sum() == 10)
    assert bool((orders["high, then low"][90:] >= 90).all())
    assert bool((orders["mixed"][:50] >= 90).any())                      # mixed: low-resource examples early too


def test_two_languages_share_part_of_their_table_and_know_their_entropy():
    high, low = emergence.two_languages(vocab_size=8, closeness=0.4, seed=3)
    other = scaling.MarkovSource(vocab_size=8, order=1, concentration=0.3, seed=1003)
    assert torch.allclose(low.table, 0.4 * high.table + 0.6 * other.table)
    assert math.isclose(low.entropy, scaling.entropy_rate(low.first_order_matrix()))
    seqs = emergence.tagged_sequences(low, 1, 5, 12, torch.Generator().manual_seed(0))
    assert seqs.shape == (5, 13) and bool((seqs[:, 0] == 9).all()) and int(seqs[:, 1:].max()) < 8


def test_a_small_run_records_losses_above_the_entropy_rate():
    result = emergence.data_order_experiment(steps=12, batch=8, length=12, low_unique=4, low_repeats=2, seeds=(0,),
                                             eval_every=6, n_embd=16, n_layer=1)
    assert math.isclose(result["share"], 8 / 96)
    for records in result["runs"].values():
        record = records[0]
        assert record["step"] == [0, 6, 12]
        for key in ("high", "low", "low, seen"):
            assert len(record[key]) == 3 and all(math.isfinite(v) for v in record[key])
        # An untrained model is far above the floor; on fresh text no model goes far below it.
        assert record["high"][0] > 0.3 and min(record["high"] + record["low"]) > -0.05
    summary = emergence.data_order_summary(result)
    assert set(summary["mixed"]) == {"high", "low", "low, seen"} and summary["mixed"]["low"][1] == 0.0
    assert len(emergence.data_order_figure(result).data) == 6
