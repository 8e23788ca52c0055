"""utils.transcript and utils.replay: the record of a test's calls into student functions, and its replay in the judge."""

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from utils import replay, transcript
from utils.checks import plain
from utils.transformer import GPTConfig


def roundtrip(value):
    return transcript.decode(transcript.from_bytes(transcript.to_bytes(transcript.encode(value))))


def test_plain_values_cross_exactly():
    Pair = collections.namedtuple("Pair", "loss count")
    value = {"t": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16),
             "n": [1, 2.5, True, None, "s", b"x", 1 + 2j], "pair": Pair(torch.zeros(1), 3),
             "dtype": torch.float16, "size": torch.Size([2, 3]), "slice": slice(1, None, 2),
             "np": np.arange(4, dtype=np.int16), "npf": np.float32(1.5), "config": GPTConfig(n_layer=1)}
    back = roundtrip(value)
    assert back.keys() == value.keys()
    assert type(back["t"]) is torch.Tensor and torch.equal(back["t"], value["t"])
    assert back["b"].dtype == torch.bfloat16 and back["n"] == value["n"]
    assert back["pair"]._fields == ("loss", "count") and back["pair"].count == 3
    assert back["dtype"] is torch.float16 and back["size"] == torch.Size([2, 3]) and back["slice"] == slice(1, None, 2)
    assert back["np"].dtype == np.int16 and (back["np"] == value["np"]).all() and back["npf"] == np.float32(1.5)
    assert back["config"] == value["config"]


def test_anything_else_is_opaque_and_a_malformed_record_is_refused():
    class Student:
        pass

    for value in (Student(), iter([1]), Student, {Student()}, lambda: 1):
        with pytest.raises(transcript.Opaque):
            transcript.encode(value)
    for tree in (("dtype", "manual_seed"), ("dataclass", "os", "path", []), ("nope", 1), ("value", object()),
                 ("tensor", torch.zeros(1)), ("list", "abc"), ["value", 1]):
        with pytest.raises(ValueError):
            transcript.decode(tree)


def test_a_record_is_read_back_as_data_only():
    """torch.load(weights_only=True) refuses to build any other class: a forged record cannot run code."""
    import base64
    import io
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    forged = base64.b64encode(pickle.dumps({"calls": [Boom()]})).decode()
    with pytest.raises(Exception):
        transcript.from_bytes(forged)
    buffer = io.BytesIO()
    torch.save({"x": Boom()}, buffer)
    with pytest.raises(Exception):
        transcript.from_bytes(base64.b64encode(buffer.getvalue()).decode())


def record_and_replay(student, test):
    """Run ``test(f)`` with ``f`` the recorded student function, then again with its replay (from
    the same random state); both results, and whether the replay used every recorded call."""
    recorder = replay.Recorder(plain)
    torch.manual_seed(0)
    first = test(recorder.wrap(student, "student"))
    calls = transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]
    replayed = replay.Replay(calls)
    torch.manual_seed(0)
    second = test(replayed.stub("student"))
    return first, second, replayed.finished()


def test_a_replay_gives_back_results_changes_in_place_and_the_random_state():
    def student(x, history):
        noise = torch.randn(3)          # the student's own draw: the test's next draw must follow it
        x.mul_(2)                       # in place, as an optimizer step does
        history.append(len(history))
        return x.sum() + noise.sum(), {"noise": noise}

    def test(f):
        x, history = torch.ones(3), []
        total, extra = f(x, history)
        return x.clone(), list(history), total, extra["noise"], torch.randn(2)

    first, second, finished = record_and_replay(student, test)
    assert finished
    for a, b in zip(first, second):
        assert a == b if isinstance(a, list) else torch.equal(a, b)


def test_gradients_flow_back_through_a_replayed_call():
    def student(logits, target):
        return torch.nn.functional.cross_entropy(logits, target), logits.softmax(-1)

    def test(f):
        logits = torch.randn(4, 5, requires_grad=True)
        loss, probs = f(logits, torch.tensor([1, 2, 3, 0]))
        (loss + probs[:, 0].sum()).backward()
        return logits.grad

    first, second, finished = record_and_replay(student, test)
    assert finished and torch.allclose(first, second)


def test_a_replay_refuses_other_calls_than_recorded():
    recorder = replay.Recorder(plain)
    f = recorder.wrap(lambda x: x + 1, "student")
    f(torch.ones(2))
    for call in (lambda g: g(torch.zeros(2)), lambda g: (g(torch.ones(2)), g(torch.ones(2)))):
        with pytest.raises(replay.Mismatch):
            call(replay.Replay(recorder.calls).stub("student"))
    with pytest.raises(replay.Mismatch):
        replay.Replay(recorder.calls).stub("other")(torch.ones(2))
    # Calls in another order (a test iterating over a set of strings) are matched by their arguments.
    words = recorder.wrap(lambda word: word.upper(), "words")
    assert [words(w) for w in ("b", "a")] == ["B", "A"]
    replayed = replay.Replay([c for c in recorder.calls if c["name"] == "words"])
    assert [replayed.stub("words")(w) for w in ("a", "b")] == ["A", "B"] and replayed.finished()
    # A gradient other than the one the recorded run sent back.
    g = recorder.wrap(lambda x: (x * 3).sum(), "loss")
    x = torch.ones(2, requires_grad=True)
    g(x).backward()
    replayed = replay.Replay(recorder.calls[1:]).stub("loss")(torch.ones(2, requires_grad=True))
    with pytest.raises(replay.Mismatch):
        (replayed * 2).backward()


def test_the_test_s_callbacks_are_called_again_by_the_replay():
    def student(query, budget):
        return query(2.0, 3.0) + query(4.0, budget)

    spent = []

    def test(f):
        spent.clear()

        def query(n, d):
            spent.append(n * d)
            return n * d + float(torch.rand(()))
        return f(query, 5.0), list(spent)

    first, second, finished = record_and_replay(student, test)
    assert finished and first == second and second[1] == [6.0, 20.0]


def test_recording_is_invisible_to_the_test_s_dispatch_modes():
    """A test that counts the operators (or the memory) of the student's call must see only the
    student's own work, not the recorder's copies."""
    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    recorded = replay.Recorder(plain).wrap(lambda x: x * 2, "student")
    x = torch.randn(8)
    with Count():
        recorded(x)
    assert seen == ["aten.mul.Tensor"], seen


def test_a_result_that_is_not_data_leaves_the_test_undecided():
    """A correct function may return something that cannot cross (a generator): the judge must not
    fail it, only say that a person should look."""
    recorder = replay.Recorder(plain)
    assert list(recorder.wrap(lambda n: (i * i for i in range(n)), "squares")(3)) == [0, 1, 4]
    with pytest.raises(replay.Undecidable):
        replay.Replay(recorder.calls).stub("squares")(3)


def test_an_iterator_is_read_once_recorded_and_handed_over_again():
    """A test may pass ``model.parameters()`` (read only once): the judge reads its own the same way."""
    def student(params, max_norm):
        params = list(params)
        total = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        for p in params:
            p.grad.mul_(min(1.0, max_norm / float(total)))
        return total

    def test(f):
        model = torch.nn.Linear(3, 2)
        model(torch.ones(4, 3)).sum().mul(10).backward()
        norm = f(model.parameters(), 0.5)
        return norm, model.weight.grad.clone(), model.bias.grad.clone()

    first, second, finished = record_and_replay(student, test)
    assert finished and all(torch.allclose(a, b) for a, b in zip(first, second))
    assert float(second[1].norm() ** 2 + second[2].norm() ** 2) ** 0.5 == pytest.approx(0.5, rel=1e-4)


def _rank_sum(total):
    import torch.distributed as dist
    t = torch.full((2,), float(dist.get_rank() + 1))
    return total(t)


def test_ranks_record_and_replay_their_own_calls():
    """A test that launches ranks (utils.distributed): each rank's calls into the student's function
    are recorded in that rank and replayed there, in the judge's own ranks."""
    from functools import partial

    from utils import distributed

    def student(t):
        import torch.distributed as dist
        dist.all_reduce(t)
        return t * 2

    recorder = replay.Recorder(plain)
    replay.ACTIVE = recorder
    try:
        first = distributed.launch(partial(_rank_sum, recorder.wrap(student, "total")), 2, timeout=60)
    finally:
        replay.ACTIVE = None
    calls = transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]
    assert [c["name"] for c in calls] == ["<launch>"] and len(calls[0]["ranks"]) == 2
    replayed = replay.Replay(calls)
    replay.ACTIVE = replayed
    try:
        second = distributed.launch(partial(_rank_sum, replayed.stub("total")), 2, timeout=60)
        assert replayed.finished()
        with pytest.raises(replay.Mismatch):  # a launch the recorded run did not make
            distributed.launch(partial(_rank_sum, replayed.stub("total")), 2, timeout=60)
    finally:
        replay.ACTIVE = None
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and torch.equal(second[0], torch.full((2,), 6.0))


def test_a_change_through_data_is_recorded_although_no_version_counts_it():
    """``w.data += d`` leaves the version counter alone; the judge must still get the new values."""
    def student(w, big):
        w.data += 1.0
        big.data[0, 0] = 5.0
        return None

    def test(f):
        w, big = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(100, 100))
        f(w, big)
        return w.detach().clone(), big.detach().clone()

    first, second, finished = record_and_replay(student, test)
    assert finished and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert float(second[1][0, 0]) == 5.0


def test_a_change_below_every_tolerance_is_recorded_too():
    """A tiny step (an optimizer's last digits) must reach the judge exactly, not be taken as no change."""
    def student(w):
        w.data[0] += 1e-7
        return None

    def test(f):
        w = torch.nn.Parameter(torch.ones(3))
        f(w)
        return w.detach().clone()

    first, second, finished = record_and_replay(student, test)
    assert finished and torch.equal(first, second) and not torch.equal(second, torch.ones(3))


def test_a_modules_mode_and_its_log_of_calls_are_written_back():
    """A course model passed to the student's function: the calls it logged and the mode it was
    left in reach the judge's model (Phase 2's generate, Phase 3's evaluate check both)."""
    from utils.transformer import ReplayLM

    def student(model, idx):
        model.eval()
        logits, past = model(idx)
        logits, past = model(idx[:, -1:], past)
        return logits.argmax(-1)

    def test(f):
        model = ReplayLM(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8), seed=0)
        picked = f(model, torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0)))
        return picked, list(model.calls), model.training, [m.training for m in model.modules()]

    first, second, finished = record_and_replay(student, test)
    assert finished and torch.equal(first[0], second[0])
    assert second[1] == [(5, False), (1, True)] and second[2] is False and not any(second[3])


def test_a_file_the_test_names_crosses_by_its_content(tmp_path):
    """A checkpoint saved by the student's function at a path of the test's is in the judge's file
    (another folder: a temporary directory has another name there), and a load is matched by what
    the file it reads holds."""
    import tempfile
    from pathlib import Path

    def save(path, tensor):
        torch.save({"t": tensor * 2}, path)

    def load(path):
        return torch.load(path, weights_only=True)["t"]

    def test(save, load):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state.pt"
            save(path, torch.arange(3.0))
            stored = torch.load(path, weights_only=True)["t"]   # the test reads the file itself
            return stored, load(path)

    recorder = replay.Recorder(plain)
    first = test(recorder.wrap(save, "save"), recorder.wrap(load, "load"))
    calls = transcript.from_bytes(transcript.to_bytes({"calls": recorder.calls}))["calls"]
    judge = replay.Replay(calls)
    second = test(judge.stub("save"), judge.stub("load"))
    assert judge.finished() and all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(second[0], torch.arange(3.0) * 2)

    judge = replay.Replay(calls)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "state.pt"
        judge.stub("save")(path, torch.arange(3.0))
        torch.save({"t": torch.zeros(3)}, path)           # another file than the student's load read
        with pytest.raises(replay.Mismatch):
            judge.stub("load")(path)
