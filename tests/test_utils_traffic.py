"""utils.traffic: a rank's communication recorded in the verifier and sent for real by the judge's ranks."""

from functools import partial

import pytest
import torch
import torch.distributed as dist

from utils import communication, distributed, replay, transcript
from utils.checks import plain


def ring_all_reduce(t):
    """A student's ring all-reduce: sends waited for only at the end, one receive buffer reused for every step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks, buffer, sends = list(t.chunk(world)), None, []
    for step in range(2 * (world - 1)):
        send, recv = (rank - step) % world, (rank - step - 1) % world
        sends.append(dist.isend(chunks[send].clone(), (rank + 1) % world))
        buffer = torch.empty_like(chunks[recv]) if buffer is None or buffer.shape != chunks[recv].shape else buffer
        dist.recv(buffer, (rank - 1) % world)
        if step < world - 1:
            chunks[recv].add_(buffer)
        else:
            chunks[recv].copy_(buffer)
    for request in sends:
        request.wait()
    return t


def max_everywhere(t):
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def in_a_group(t):
    group = dist.new_group(list(range(dist.get_world_size())))   # all ranks, but not the default group
    dist.all_reduce(t, group=group)
    return t


def _rank_test(student, n=10):
    """What a Phase 7 test does in a rank: the student's call inside a communication log."""
    t = torch.arange(float(n)) * (dist.get_rank() + 1)
    with communication.CommLog() as log:
        out = student(t)
    return log.summary(), log.bytes_sent(), out.clone()


def record(student, world):
    recorder = replay.Recorder(plain)
    replay.ACTIVE = recorder
    try:
        results = distributed.launch(partial(_rank_test, recorder.wrap(student, "student")), world, timeout=60)
    finally:
        replay.ACTIVE = None
    return results, transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]


def replayed(calls, world):
    judge = replay.Replay(calls)
    replay.ACTIVE = judge
    try:
        return distributed.launch(partial(_rank_test, judge.stub("student")), world, timeout=60)
    finally:
        replay.ACTIVE = None


def rank_calls(calls):
    return [transcript.from_bytes(text) for text in calls[0]["ranks"]]


def with_rank_calls(calls, ranks):
    forged = [dict(calls[0])]
    forged[0]["ranks"] = [transcript.to_bytes(r) for r in ranks]
    return forged


def test_the_judge_sends_what_the_students_ranks_sent():
    first, calls = record(ring_all_reduce, 3)
    assert all(torch.equal(out, torch.arange(10.0) * 6) for _, _, out in first)
    assert all(call[0]["traffic"] for call in rank_calls(calls))
    second = replayed(calls, 3)
    for (summary, sent, out), (summary_again, sent_again, out_again) in zip(first, second):
        assert summary == summary_again and summary.keys() == {"send", "recv"}
        assert sent == sent_again >= 2 / 3 * 10 * 4   # real bytes, counted by the judge's own log
        assert torch.equal(out, out_again)


def test_reductions_other_than_the_sum_replay_too():
    first, calls = record(max_everywhere, 2)
    second = replayed(calls, 2)
    assert all(torch.equal(a[2], b[2]) and a[0] == b[0] for a, b in zip(first, second))
    assert torch.equal(second[0][2], torch.arange(10.0) * 2)


def test_a_message_no_rank_sent_never_arrives():
    """A forged record: rank 1 claims it received other values than rank 0 sent it."""
    _, calls = record(ring_all_reduce, 2)
    ranks = rank_calls(calls)
    received = next(op for op in ranks[1][0]["traffic"] if op["op"] == "recv_")
    received["after"][0] += 1.0
    with pytest.raises(distributed.RankError, match="Mismatch"):
        replayed(with_rank_calls(calls, ranks), 2)


def test_a_claimed_send_must_be_received_as_claimed():
    """A forged record: rank 0 claims to have sent what rank 1 never recorded receiving."""
    _, calls = record(ring_all_reduce, 2)
    ranks = rank_calls(calls)
    for op in ranks[0][0]["traffic"]:
        if op["op"] == "send":
            op["args"][0][0] += 1.0
            op["after"][0] += 1.0
    with pytest.raises(distributed.RankError, match="Mismatch"):
        replayed(with_rank_calls(calls, ranks), 2)


def test_an_operator_outside_the_list_is_refused():
    _, calls = record(max_everywhere, 2)
    ranks = rank_calls(calls)
    ranks[0][0]["traffic"][0]["op"] = "monitored_barrier_"
    with pytest.raises(distributed.RankError, match="malformed"):
        replayed(with_rank_calls(calls, ranks), 2)


def test_a_group_other_than_the_default_one_leaves_the_test_undecided():
    first, calls = record(in_a_group, 2)
    assert torch.equal(first[0][2], torch.arange(10.0) * 3)
    call = rank_calls(calls)[0][0]
    assert call["undecidable"] is True and "process group" in call["opaque"]


def test_communication_hidden_from_the_recorder_counts_nothing_in_the_judge():
    """A student's process that kept its traffic out of the record (memory rewritten, say) gets a
    judge whose own log saw no byte: a test's lower bound ("a ring sends at least (N-1)/N of the
    tensor") fails there, whatever the student's process counted."""
    first, calls = record(ring_all_reduce, 2)
    ranks = rank_calls(calls)
    for calls_of_rank in ranks:
        del calls_of_rank[0]["traffic"]
    second = replayed(with_rank_calls(calls, ranks), 2)
    assert all(sent > 0 for _, sent, _ in first)
    assert all(summary == {} and sent == 0 for summary, sent, _ in second)
