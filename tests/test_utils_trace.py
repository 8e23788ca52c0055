"""utils.trace: the operators a student's call ran, recorded under a test's watching mode and run again by the judge."""

import pytest
import torch

from utils import attention, checks, replay, transcript
from utils.checks import plain


def tiled(q, k, v, block):
    """A student's one-pass attention over blocks of keys (online softmax)."""
    m = torch.full(q.shape[:-1] + (1,), float("-inf"))
    denominator, out = torch.zeros_like(m), torch.zeros(q.shape[:-1] + (v.shape[-1],))
    for start in range(0, k.shape[-2], block):
        scores = q @ k[..., start:start + block, :].transpose(-2, -1) / q.shape[-1] ** 0.5
        new_m = torch.maximum(m, scores.amax(-1, keepdim=True))
        weights, scale = (scores - new_m).exp(), (m - new_m).exp()
        denominator = denominator * scale + weights.sum(-1, keepdim=True)
        out = out * scale + weights @ v[..., start:start + block, :]
        m = new_m
    return out / denominator


def one_pass(f):
    """What Phase 1's test does: the reads of keys and values watched while the function runs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 4, generator=g) for n in (2, 40, 40))
    with attention.TiledReads(k, v) as record:
        out = f(q, k, v, 8)
    return out, record.reads, record.largest_bytes


def recorded(student, test, *names):
    recorder = replay.Recorder(plain)
    first = test(*(recorder.wrap(s, n) for s, n in zip(student, names)))
    return first, transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]


def judged(calls, test, *names):
    judge = replay.Replay(calls)
    second = test(*(judge.stub(n) for n in names))
    assert judge.finished()
    return second


def test_the_judges_own_modes_see_the_operators_the_student_ran():
    first, calls = recorded([tiled], one_pass, "tiled")
    assert calls[0]["trace"]["ops"], "a call under a watching mode is recorded with its operators"
    second = judged(calls, one_pass, "tiled")
    assert torch.allclose(first[0], second[0])
    assert first[1] == second[1] and len(second[1]["keys"]) == 5   # five blocks of keys read, in the judge too
    assert first[2] == second[2] > 0


def test_without_a_watching_mode_no_trace_is_recorded():
    _, calls = recorded([tiled], lambda f: f(torch.ones(1, 2, 4), torch.ones(1, 8, 4), torch.ones(1, 8, 4), 4),
                        "tiled")
    assert "trace" not in calls[0]


def test_a_switched_off_operator_in_a_trace_fails_in_the_judge():
    """A forged trace: an honest record with one operator replaced by the switched-off softmax."""
    def test(f):
        with checks.shortcuts_off(ops=("softmax",), message="write the softmax yourself"):
            return f(torch.randn(3, 5, generator=torch.Generator().manual_seed(1)))

    def student(x):
        e = (x - x.amax(-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdim=True)

    first, calls = recorded([student], test, "softmax")
    ops = calls[0]["trace"]["ops"]
    last = len(ops) - 1
    ops[last] = ("aten._softmax.default", ("list", [ops[0][1][1][0], ("v", -1), ("v", False)]), ("list", []), None)
    with pytest.raises(AssertionError, match="write the softmax yourself"):
        judged(calls, test, "softmax")


def test_a_result_the_trace_does_not_compute_is_a_mismatch():
    first, calls = recorded([tiled], one_pass, "tiled")
    calls[0]["result"][1][0] += 1.0     # the returned value forged, the operators left as they ran
    with pytest.raises(replay.Mismatch, match="do not compute"):
        judged(calls, one_pass, "tiled")


def test_a_computation_the_recorder_did_not_see_leaves_the_test_undecided():
    """Operators run below every dispatch mode (what escaping the modes or rewriting memory does)
    produce a result no recorded operator explains: a person decides."""
    def escaping(q, k, v, block):
        with transcript.unseen():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    first, calls = recorded([escaping], one_pass, "tiled")
    assert first[1] == {"keys": [], "values": []}     # the test's own mode saw nothing either
    with pytest.raises(replay.Undecidable, match="no operator the recorder saw"):
        judged(calls, one_pass, "tiled")


def test_random_operators_draw_the_same_numbers_in_the_judge():
    def test(f):
        with checks.LargestTensor() as record:
            torch.manual_seed(3)
            out = f(torch.ones(50, 8))
            after = torch.rand(2)
        return out, after, record.largest_bytes

    def student(x):
        return torch.nn.functional.dropout(x, 0.5, training=True) + torch.rand_like(x)

    first, calls = recorded([student], test, "dropout")
    assert any(op[3] is not None for op in calls[0]["trace"]["ops"])
    second = judged(calls, test, "dropout")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]


def test_a_forged_trace_cannot_make_the_judge_touch_files_or_raw_memory(tmp_path):
    first, calls = recorded([tiled], one_pass, "tiled")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(64))
    for op in (("aten.from_file.default", ("list", [("v", str(secret)), ("v", True), ("v", 16)]), ("list", []), None),
               ("aten._print.default", ("list", [("v", "leaked")]), ("list", []), None),
               ("aten.set_.source_Tensor", ("list", [("t", ("const", 0)), ("t", ("const", 0))]), ("list", []), None)):
        forged = transcript.from_bytes(transcript.to_bytes(calls))
        forged[0]["trace"]["ops"].insert(0, op)
        with pytest.raises(replay.Mismatch, match="does not run"):
            judged(forged, one_pass, "tiled")
    assert secret.read_bytes() == bytes(64)


def test_a_student_s_call_of_a_refused_operator_leaves_the_test_to_a_person():
    def student(x):
        print_ = torch.ops.aten._print.default
        print_("a student's debugging line")
        return x * 2

    def test(f):
        with checks.LargestTensor():
            return f(torch.ones(3))

    _, calls = recorded([student], test, "student")
    assert calls[0]["undecidable"] is True and "_print" in calls[0]["opaque"]


def test_neither_side_keeps_a_tensor_alive_longer_than_the_student_s_code():
    """A test watching peak memory: the recorder holds no operator output, and the judge lets each
    go after the last operator that reads it, so both measure the student's own peak."""
    from utils.memory_accounting import PeakMemory

    def student(x):
        total = x.sum()
        for _ in range(10):
            total = total + (x * 2).sum()     # a temporary as large as x, let go at once
        return total

    def test(f):
        x = torch.ones(256, 1024)
        with PeakMemory(x) as peak:
            out = f(x)
        return out, peak.peak - peak.start

    first, calls = recorded([student], test, "student")
    second = judged(calls, test, "student")
    assert torch.equal(first[0], second[0])
    size = 256 * 1024 * 4
    assert size <= first[1] < 2 * size and size <= second[1] < 2 * size
