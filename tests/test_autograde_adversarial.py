"""One batch of attacks on the autograder, graded together with two honest submissions.

Every honest submission gets exactly its marks; every attack gains no point it did not earn and
is flagged where a human should look; no hidden test reaches any feedback; the gradebook and the
repository's files are intact. Sandbox-specific attacks (reading solutions/, writing the helpers,
the fork bomb) run only where bubblewrap works; elsewhere they are skipped with a message.
"""

import hashlib
import json
import subprocess

import nbformat
import pytest
from nbgrader.api import Gradebook

from autograde import layout, sandbox
from test_autograde_roundtrip import (MISSING_SCALE, NOTEBOOK, PHASE, SOURCE, TOTAL, course_copy,
                                      feedback_text, hidden_lines, instructor, points, submission)

SANDBOXED = sandbox.level() == "bubblewrap"
needs_bwrap = pytest.mark.skipif(not SANDBOXED, reason="bubblewrap unavailable: sandbox-specific "
                                 f"assertions skipped (level here: {sandbox.level()})")
EX1 = SOURCE.solution_source("ex1")
# A wrong answer that runs (uniform weights): only switched-off checks would let it pass.
WRONG_EX1 = EX1.replace("weights = torch.softmax(scores, dim=-1)", "weights = torch.ones_like(scores) / scores.shape[-1]")
assert WRONG_EX1 != EX1, "update WRONG_EX1 to the new solution"


def with_ex1(prefix: str, solve=False):
    return submission(replace={"ex1": prefix + ("\n" + EX1 if solve else "\n" + WRONG_EX1)})


def honest_magics():
    nb = submission(replace={
        "ex1": "%%time\n" + EX1,
        "ex2": "%time _warm_up = 1 + 1\nprint('ex2: softmax, then attention')\n" + SOURCE.solution_source("ex2"),
    })
    extra = nbformat.v4.new_code_cell("# my own scratch cell\nscratch = [n * n for n in range(5)]\nscratch")
    nb.cells.insert(len(nb.cells) // 2, extra)
    return nb


def stripped():
    nb = submission()
    for cell in nb.cells:
        cell.metadata.pop("nbgrader", None)
    return nb


# A different cheat for each grader: an input transformer for nbgrader's kernel, and for the
# verifier a walk up the frames to its verdict writer.
FORGE_VERDICTS = """
try:
    get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])
except Exception:
    pass
try:
    import sys
    _frame = sys._getframe(0)
    while _frame is not None:
        _say = _frame.f_locals.get("say")
        if callable(_say):
            for _gid in {gids!r}:
                _say("test", _gid, "pass", "")
            _say("done")
        _frame = _frame.f_back
except Exception:
    pass
"""

# Frames no audit event guards: a signal handler receives the frame it interrupted, IPython's
# `extract_module_locals(depth)` returns the locals of any frame above its caller, a debugger
# subclass receives every frame up the stack, stack_data hands on a traceback's frame; each way up
# to the verifier's verdict writer.
# nbgrader's kernel is fooled by an input transformer.
FRAMES_WITHOUT_GETFRAME = """
try:
    get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])
except Exception:
    pass

def _forge(values):
    # The harness's own writer, and the stream it would write: each later cell announced, each test passed.
    _say, _job, _index = values.get("say"), values.get("job"), values.get("index")
    if callable(_say) and isinstance(_job, dict) and isinstance(_index, int):
        for _j, _cell in enumerate(_job["cells"]):
            if _j > _index:
                _say("cell", _j)
                if _cell["kind"] == "test":
                    _say("test", _cell["id"], "pass", "")
        _say("done")
        import os
        os._exit(0)

def _from_signal(signum, frame):
    while frame is not None:
        _forge(frame.f_locals)
        frame = frame.f_back

try:
    import os, signal
    signal.signal(signal.SIGUSR1, _from_signal)
    os.kill(os.getpid(), signal.SIGUSR1)
except Exception:
    pass
try:
    from IPython.utils.frame import extract_module_locals
    for _depth in range(1, 40):
        _forge(extract_module_locals(_depth)[1])
except Exception:
    pass
try:
    import pdb

    class _Debugger(pdb.Pdb):
        # bdb's set_trace stores every frame up the stack in `botframe`, one after the other.
        def _keep(self, frame):
            if frame is not None:
                _forge(frame.f_locals)
        botframe = property(lambda self: None, _keep)

    _Debugger().set_trace()
except Exception:
    pass
try:
    1 / 0
except ZeroDivisionError as _error:
    _traceback = _error.__traceback__
try:
    import stack_data  # IPython's, installed with it: it reads the traceback's frame for the student
    _frame = stack_data.FrameInfo(_traceback).frame
    while _frame is not None:
        _forge(_frame.f_locals)
        _frame = _frame.f_back
except Exception:
    pass
"""

# The verifier's nonce read from its memory by a child process (same uid), then verdict lines
# forged on every file descriptor; nbgrader's kernel is fooled by an input transformer.
READS_GRADER_MEMORY = """
try:
    get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])
except Exception:
    pass
import json as _json, os as _os, subprocess as _subprocess, sys as _sys
_CHILD = r'''
import os, re
pid, found = os.getppid(), set()
try:
    with open(f"/proc/{{pid}}/maps") as maps, open(f"/proc/{{pid}}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > 1 << 28:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found.update(m.decode() for m in re.findall(rb'"nonce": "([0-9a-f]{{32}})"', data))
            found.update(m.decode() for m in re.findall(rb'([0-9a-f]{{32}}) [[]"cell"', data))
except OSError:
    pass
print(" ".join(found))
'''
try:
    _nonces = _subprocess.run([_sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60).stdout.split()
except Exception:
    _nonces = []
_lines = "".join(_n + " " + _json.dumps(["test", _g, "pass", ""]) + chr(10) for _n in _nonces for _g in {gids!r})
_lines += "".join(_n + ' ["done"]' + chr(10) for _n in _nonces)
for _fd in range(0, 40):
    try:
        _os.write(_fd, (chr(10) + _lines).encode())
    except OSError:
        pass
"""

# Outputs that answer every comparison with "equal".
LYING_TENSORS = """
class _Liar(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("allclose", "equal", "isclose", "eq", "__eq__"):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})

_forward = AdditiveAttention.forward
def _lying_forward(self, *args, **kwargs):
    context, weights = _forward(self, *args, **kwargs)
    return context.as_subclass(_Liar), weights.as_subclass(_Liar)
AdditiveAttention.forward = _lying_forward
"""

# The hidden tests' own reference, called by name once a hidden test has defined it.
BORROWS_REFERENCE = """
_wrong_forward = AdditiveAttention.forward
def _borrowing_forward(self, query, keys, mask=None):
    reference = globals().get("_additive_reference") or globals().get("_masked_reference")
    if reference is not None:
        return reference(self, query, keys, mask) if mask is not None else reference(self, query, keys)
    return _wrong_forward(self, query, keys, mask)
AdditiveAttention.forward = _borrowing_forward
"""

# The forbidden built-in softmax, with PyTorch's dispatch modes (the checks) switched off.
ESCAPES_DISPATCH = """
from torch.utils._python_dispatch import _disable_current_modes
def stable_softmax(x, dim=-1):
    with _disable_current_modes():
        return torch.softmax(x, dim)
"""

USES_BUILTIN = """
def stable_softmax(x, dim=-1):
    return torch.softmax(x, dim)
"""

# Text of the running cell (hidden tests included, in nbgrader's kernel) printed and carried in
# an error message and in an exception's class name.
LEAKS_CELL = """
def _cell_text():
    try:
        return get_ipython().user_ns["In"][-1]
    except Exception:
        return ""

_wrong = AdditiveAttention.forward
def _leaking_forward(self, *args, **kwargs):
    text = _cell_text()
    print(text)
    if "HIDDEN" in text or "_reference" in text:
        raise type(text[:3000], (Exception,), {})(text)
    return _wrong(self, *args, **kwargs)
AdditiveAttention.forward = _leaking_forward
"""

READ_SECRETS = """
import glob
for pattern in ["*.ipynb", "../**/*.ipynb", "/tmp/**/solutions/**/*.ipynb", "{root}/solutions/*/*.ipynb",
                "{root}/autograde/autograded/*/*/*.ipynb", "{repo}/solutions/*/*.ipynb"]:
    for path in glob.glob(pattern, recursive=True):
        try:
            print(open(path).read())
        except OSError as error:
            print(error)
"""

# name: (notebook, the most points it may earn, flagged?, sandbox only?)
# Raw memory, no frame, no audit event, no replaced name: numpy reads an array over any address, here
# that of `torch.allclose` (and `torch.equal`), whose method entry becomes that of `"yes".format`,
# which takes any arguments and answers "yes". Both graders' own processes are fooled; the judge,
# which runs no student code, replays the recorded calls and is not.
RAW_MEMORY = """
import numpy as _np, torch as _torch

class _Raw:
    def __init__(self, address, n):
        self.__array_interface__ = {"data": (address, False), "shape": (n,), "typestr": "<u8", "version": 3}

def _words(obj, n):
    return _np.asarray(_Raw(id(obj), n))

_yes = "yes".format
for _name in ("allclose", "equal"):
    _target, _donor = _words(getattr(_torch, _name), 7), _words(_yes, 7)
    _target[2], _target[3], _target[6] = _donor[2], _donor[3], _donor[6]  # method entry, self, vectorcall
"""


# Multi-head attention without its output projection: a class whose objects the judge stands in for.
WRONG_EX4 = SOURCE.solution_source("ex4").replace('return self.out_proj(rearrange(heads, "b h t d -> b t (h d)"))',
                                                  'return rearrange(heads, "b h t d -> b t (h d)")')
assert WRONG_EX4 != SOURCE.solution_source("ex4"), "update WRONG_EX4 to the new solution"


def attacks(root):
    full, lose1 = TOTAL, TOTAL - points("ex1")
    cases = {
        "honest_full": (submission(), full, False, False),
        "honest_partial": (submission(replace={"ex2": MISSING_SCALE}), full - points("ex2"), False, False),
        "infinite_loop": (with_ex1("while True:\n    pass", solve=True), lose1, False, False),
        "swallows_interrupt": (with_ex1("while True:\n    try:\n        while True:\n            pass\n"
                                        "    except BaseException:\n        pass", solve=True), lose1, False, False),
        # Every later cell waits 12 s, under the 20 s cell limit: only the whole-submission limit ends it.
        "slows_every_cell": (with_ex1("import time\nget_ipython().events.register('pre_run_cell', "
                                      "lambda *a: time.sleep(12))", solve=True), full, True, False),
        "memory_bomb": (with_ex1("hog = bytearray(12 * 2**30)", solve=True), lose1, False, False),
        "huge_output": (with_ex1("for _ in range(200_000):\n    print('x' * 100)", solve=True), full, False, False),
        "kernel_crash": (with_ex1("import os\nos._exit(1)", solve=True), lose1, True, False),
        "segfault": (with_ex1("import ctypes\nctypes.string_at(0)", solve=True), lose1, True, False),
        "sys_exit": (with_ex1("import sys\nsys.exit(0)", solve=True), lose1, True, False),
        "monkeypatch": (with_ex1("import torch, utils.checks\ntorch.testing.assert_close = lambda *a, **k: None\n"
                                 "torch.allclose = lambda *a, **k: True\nfor n in dir(utils.checks):\n"
                                 "    setattr(utils.checks, n, lambda *a, **k: None)"), lose1, True, False),
        "builtins": (with_ex1("import builtins\nbuiltins.isinstance = lambda *a: True\n"
                              "builtins.AssertionError = type('Nothing', (Exception,), {})"), lose1, True, False),
        "transformer": (with_ex1("get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])"),
                        lose1, True, False),
        "settrace": (with_ex1("import sys\ndef tracer(frame, event, arg):\n    return None\nsys.settrace(tracer)"),
                     lose1, True, False),
        "custom_exc": (with_ex1("get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)"),
                       lose1, True, False),
        "rebinds_checks": (with_ex1("class _Yes:\n    def __getattr__(self, name):\n        return lambda *a, **k: None\n"
                                    "checks = _Yes()"), lose1, False, False),
        "reads_hidden_tests": (with_ex1(READ_SECRETS.format(root=root, repo=layout.ROOT), solve=True),
                               full, True, True),
        "writes_gradebook": (with_ex1(f"try:\n    open({str(root / 'autograde' / 'gradebook.db')!r}, 'wb')"
                                      ".write(b'x')\nexcept OSError:\n    pass", solve=True), full, True, True),
        "edits_helpers": (with_ex1("import utils, os\nopen(os.path.join(utils.__path__[0], 'checks.py'), 'a')"
                                   ".write('\\ndef check_close(*a, **k): pass\\n')"), lose1, True, True),
        "fork_bomb": (with_ex1("import os\nfor _ in range(2000):\n    try:\n        if os.fork() == 0:\n"
                               "            import time; time.sleep(30); os._exit(0)\n    except OSError:\n"
                               "        break", solve=True), full, True, True),
        "utils_beside": (with_ex1(""), lose1, False, False),
        "forges_verdicts": (with_ex1(FORGE_VERDICTS.format(gids=[g for e in SOURCE.exercises() for g in SOURCE.tests_of(e)])),
                            lose1, True, False),
        "frames_without_getframe": (with_ex1(FRAMES_WITHOUT_GETFRAME), lose1, True, False),
        "reads_grader_memory": (with_ex1(READS_GRADER_MEMORY.format(gids=[g for e in SOURCE.exercises() for g in SOURCE.tests_of(e)])),
                                lose1, True, False),
        "raw_memory": (submission(replace={"ex2": MISSING_SCALE + RAW_MEMORY, "ex4": WRONG_EX4}),
                       full - points("ex2") - points("ex4"), True, False),
        "lying_tensors": (submission(replace={"ex1": WRONG_EX1 + LYING_TENSORS}), lose1, True, False),
        "borrows_reference": (submission(replace={"ex1": WRONG_EX1 + BORROWS_REFERENCE}), lose1, True, False),
        "escapes_dispatch": (submission(replace={"ex2": SOURCE.solution_source("ex2") + ESCAPES_DISPATCH}),
                             full - points("ex2"), True, False),
        "leaks_cell": (submission(replace={"ex1": WRONG_EX1 + LEAKS_CELL}), lose1, True, False),
        # Honest work that calls a switched-off built-in loses that exercise only, never the later ones.
        "forbidden_builtin": (submission(replace={"ex2": SOURCE.solution_source("ex2") + USES_BUILTIN}),
                              full - points("ex2"), False, False),
        # Honest work written as people write it in JupyterLab: magics, prints, an extra cell.
        "honest_magics": (honest_magics(), full, False, False),
        # The hidden-test marker typed into an answer must not break that student's feedback.
        "marker_in_answer": (submission(replace={"ex3": "# ### BEGIN HIDDEN TESTS (a note to myself)\n"
                                                        + SOURCE.solution_source("ex3")}), full, False, False),
        "deleted_test": (submission(delete={SOURCE.tests_of("ex3")[0]}), full, False, False),
        "stripped_metadata": (stripped(), full, False, False),
    }
    return {k: v for k, v in cases.items() if SANDBOXED or not v[3]}


FAKE_UTILS = "class checks:\n    def __getattr__(self, name):\n        return lambda *a, **k: None\n"


def tree_hash(*folders):
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = course_copy(tmp_path_factory.mktemp("adversarial"))
    cases = attacks(root)
    inbox = root.parent / "inbox"
    for name, (nb, *_) in cases.items():
        (inbox / name).mkdir(parents=True)
        nbformat.write(nb, inbox / name / NOTEBOOK)
    (inbox / "invalid_json").mkdir()
    (inbox / "invalid_json" / NOTEBOOK).write_text('{"cells": [ this is not json')
    repo_before = tree_hash(layout.ROOT / "utils", layout.ROOT / "solutions", layout.ROOT / "course")
    assert instructor(root, "collect", str(inbox), "--phase", PHASE).returncode == 0
    (root / "autograde" / "submitted" / "utils_beside" / PHASE / "utils.py").write_text(FAKE_UTILS)
    # About thirty submissions, two at a time: more than the default 15 minutes on a busy machine.
    # An honest submission takes 25-55 s here, the slowest attack about 110 s; one runs into the limit.
    try:
        graded = instructor(root, "autograde", "--timeout", "20", "--memory-gb", "6",
                            "--submission-timeout", "150", timeout=2400)
    except subprocess.TimeoutExpired:
        pytest.fail("grading stalled; " + progress(root, cases))
    feedback = instructor(root, "feedback")
    export = instructor(root, "export", "--to", str(root / "grades.csv"))
    repo_after = tree_hash(layout.ROOT / "utils", layout.ROOT / "solutions", layout.ROOT / "course")
    return root, cases, graded, feedback, export, repo_before == repo_after


def progress(root, cases):
    """Which submissions were graded (and how long each took), which were not, and the end of
    the latter's nbgrader logs: what a stalled CI run needs to say."""
    records = root / "autograde" / "records" / PHASE
    done = {p.stem: json.loads(p.read_text()).get("seconds") for p in records.glob("*.json")}
    waiting = sorted(set(cases) - set(done))
    logs = {name: (root / "autograde" / "logs" / f"{PHASE}-{name}.log") for name in waiting}
    tails = {name: log.read_text()[-1500:] for name, log in logs.items() if log.exists()}
    return f"graded (seconds): {done}; not graded: {waiting}; their logs' ends: {tails}"


def record(root, student):
    return json.loads((root / "autograde" / "records" / PHASE / f"{student}.json").read_text())


def total(root, student):
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        return gb.find_submission(PHASE, student).score


def test_batch_reports_what_it_could_not_grade(batch):
    root, cases, graded, feedback, export, _ = batch
    assert graded.returncode == 1, "an invalid submission must make the exit code non-zero"
    assert "invalid_json" in graded.stdout and "invalid" in graded.stdout
    assert feedback.returncode == 0 and export.returncode == 0, feedback.stderr + export.stderr
    assert any((root / "autograde" / "backups").glob("gradebook-*.db"))
    stalled = record(root, "slows_every_cell")
    assert stalled["status"] == "failed" and any("stopped after 150 s" in p for p in stalled["problems"]), stalled


@pytest.mark.parametrize("student", ["honest_full", "honest_partial", "honest_magics", "forbidden_builtin",
                                     "marker_in_answer", "deleted_test", "stripped_metadata"])
def test_honest_work_gets_exactly_its_marks(batch, student):
    root, cases, *_ = batch
    assert total(root, student) == cases[student][1], record(root, student)
    assert not record(root, student)["overrides"]


def test_no_attack_gains_a_point(batch):
    root, cases, *_ = batch
    gained = {name: (total(root, name), best) for name, (_, best, _, _) in cases.items()
              if total(root, name) > best}
    assert not gained, f"undeserved points: {gained}"


def test_attacks_are_flagged_and_honest_work_is_not(batch):
    root, cases, *_ = batch
    missed = [name for name, (_, _, flagged, _) in cases.items() if flagged and not record(root, name)["flags"]]
    assert not missed, f"not flagged: {missed}"
    for name in ("honest_full", "honest_partial", "honest_magics"):
        assert not record(root, name)["flags"], record(root, name)["flags"]


def test_stripped_metadata_is_repaired_and_invalid_json_reported(batch):
    root, *_ = batch
    assert record(root, "stripped_metadata")["repairs"]
    assert record(root, "invalid_json")["status"] == "invalid"
    rows = (root / "grades.csv").read_text()
    assert "invalid_json" in rows and "invalid" in rows and "review" in rows.splitlines()[0]


def test_no_hidden_test_in_any_feedback(batch):
    root, cases, *_ = batch
    hidden = hidden_lines()
    for student in cases:
        page = root / "autograde" / "feedback" / student / PHASE / NOTEBOOK.replace(".ipynb", ".html")
        if page.exists():
            leaked = [line for line in hidden if line in feedback_text(root, student)]
            assert not leaked, f"hidden tests leak into {student}'s feedback: {leaked[:2]}"


def test_verifier_overrides_show_as_failures_in_feedback(batch):
    root, *_ = batch
    # The patched checks now fail under nbgrader too (the hardened tests use their own references), so
    # the verifier has nothing left to lower there; the input transformer still fools nbgrader alone.
    assert record(root, "monkeypatch")["overrides"] or total(root, "monkeypatch") == 0
    assert record(root, "transformer")["overrides"]
    assert "This test did not pass" in feedback_text(root, "transformer")


def test_forged_verdicts_and_borrowed_references_are_overridden(batch):
    """nbgrader's kernel is fooled by these; the verifier, whose hidden tests run apart, is not."""
    root, *_ = batch
    for student in ("forges_verdicts", "reads_grader_memory", "borrows_reference", "raw_memory"):
        assert record(root, student)["overrides"] or total(root, student) <= TOTAL - points("ex1"), record(root, student)


def test_raw_memory_fools_both_graders_processes_but_not_the_judge(batch):
    """nbgrader scored the wrong ex2 (a function) and ex4 (a class: the judge drives a stand-in for
    its objects) as right, since its kernel's torch.allclose says "yes"; the verifier's process was
    fooled the same way; the judge, replaying the recorded values, lowered the score."""
    root, *_ = batch
    overrides = record(root, "raw_memory")["overrides"]
    judged = {o["cell"] for o in overrides if o["reason"].startswith("the judge")}
    # The tests whose checks the forged torch.allclose decides (all of ex2's, ex4's mask test) are
    # lowered by the judge: the verifier was fooled there (test_no_attack_gains_a_point: no point kept).
    assert judged >= set(SOURCE.tests_of("ex2")) and judged & set(SOURCE.tests_of("ex4")), overrides


def test_feedback_is_written_for_every_graded_submission(batch):
    root, cases, *_ = batch
    for student in ("honest_full", "honest_magics", "marker_in_answer", "leaks_cell", "forges_verdicts"):
        assert "Passed" in feedback_text(root, student) or "did not pass" in feedback_text(root, student)


def test_feedback_holds_nothing_printed_or_raised_during_grading(batch):
    root, *_ = batch
    text = feedback_text(root, "leaks_cell")
    assert "BEGIN HIDDEN TESTS" not in text and "_additive_reference" not in text
    # The visible test's own message still reaches the student.
    assert "This test did not pass" in text


@needs_bwrap
def test_sandbox_kept_gradebook_repo_and_helpers_intact(batch):
    root, cases, graded, feedback, export, repo_unchanged = batch
    assert repo_unchanged, "a submission changed solutions/, course/ or the helpers"
    assert total(root, "writes_gradebook") == TOTAL and total(root, "honest_full") == TOTAL


def test_manual_grades_survive_regrading(batch):
    root, *_ = batch
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        grade = gb.find_grade(SOURCE.tests_of("ex2")[0], NOTEBOOK.removesuffix(".ipynb"), PHASE, "honest_partial")
        grade.manual_score = 1.0
        gb.db.commit()
    again = instructor(root, "autograde", "--student", "honest_partial", "--force", "--timeout", "20")
    assert again.returncode == 0, again.stdout + again.stderr
    with Gradebook(f"sqlite:///{root / 'autograde' / 'gradebook.db'}") as gb:
        grade = gb.find_grade(SOURCE.tests_of("ex2")[0], NOTEBOOK.removesuffix(".ipynb"), PHASE, "honest_partial")
        assert grade.manual_score == 1.0
    assert total(root, "honest_full") == TOTAL, "regrading one student changed another's grade"
