"""Unit tests of the instructor tooling that need no nbgrader run."""

import re
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from autograde import layout, notebooks
from autograde.cells import as_python, split_test
from autograde.feedback import FeedbackFromVerdicts
from autograde.cli import main


def cell(source, **nbgrader):
    """A code cell with nbgrader's metadata (not graded, not a solution, unless told)."""
    meta = {"grade": False, "solution": False, "locked": False, "schema_version": 3, **nbgrader}
    return new_code_cell(source, metadata={"nbgrader": meta})


def grade_cell(source, outputs=()):
    cell = new_code_cell(source, outputs=list(outputs))
    cell.metadata["nbgrader"] = {"grade": True, "grade_id": "t", "locked": True, "points": 1,
                                 "schema_version": 3, "solution": False}
    return cell


def test_test_cells_split_into_visible_and_hidden_parts():
    visible, hidden = split_test("check(x)\n### BEGIN HIDDEN TESTS\nassert secret_reference(x)\n"
                                 "### END HIDDEN TESTS\nafter()\n")
    assert visible == "check(x)\n" and "secret_reference" in hidden and "after()" in hidden
    assert split_test("check(x)\n") == ("check(x)\n", "")


def test_student_cells_are_read_as_ipython_reads_them():
    code = as_python("%time y = f(x)\n!ls\nx = 1\n")
    assert "get_ipython().run_line_magic('time', 'y = f(x)')" in code and "x = 1" in code
    compile(code, "cell", "exec")
    assert as_python("def broken(:\n") == "def broken(:\n", "what IPython cannot read stays as it was"


def test_feedback_lines_carry_scores_and_the_visible_message_only():
    passed = FeedbackFromVerdicts._line(3.0, 3.0, "ignored").text
    assert "Passed (3 of 3 points)" in passed and "ignored" not in passed
    failed = FeedbackFromVerdicts._line(0.0, 3.0, "AssertionError: weights do not sum to 1").text
    assert "This test did not pass" in failed and "weights do not sum to 1" in failed


def test_notebook_cleaning_strips_outputs_and_volatile_metadata(tmp_path):
    cell = new_code_cell("1 + 1", outputs=[new_output("execute_result", data={"text/plain": "2"})],
                         execution_count=3)
    cell.metadata["collapsed"] = True
    nb = new_notebook(cells=[cell], metadata={"widgets": {"state": {}}})
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert len(notebooks.problems(path)) == 3
    assert notebooks.clean_file(path)
    assert notebooks.problems(path) == []
    assert not notebooks.clean_file(path), "cleaning is idempotent"


def test_lms_file_names_are_parsed():
    pattern = re.compile(layout.LMS_FILENAME_REGEX)
    for name, student in [("/x/alice_attention.ipynb", "alice"),
                          ("/x/bob.smith_1234_5678_attention.ipynb", "bob.smith"),
                          ("/x/carol_late_12_34_attention.ipynb", "carol")]:
        match = pattern.match(name)
        assert match and match["student_id"] == student and match["file_id"] == "attention.ipynb"


def test_unknown_phase_is_refused(capsys):
    try:
        main(["release", "--phase", "99_nonsense"])
    except SystemExit as stop:
        assert "unknown phase" in str(stop)
    else:
        raise AssertionError("an unknown phase must be refused")


def test_suspicion_flags_patching_and_machinery_but_not_plain_code():
    from autograde.suspicion import flags
    setup = "import torch\nfrom utils import checks"
    honest = ["def f(x):\n    \"\"\"Weights sum to 1...\"\"\"\n    y = x.softmax(-1)\n    return y\n%time f(1)"]
    honest.append("def add(model, name, layer):\n    parent, _, child = name.rpartition('.')\n"
                  "    setattr(model.get_submodule(parent), child, layer)\n    copy = stack = 1\n"
                  "def replace(x):\n    return x")
    assert flags(honest, setup) == []
    found = flags(["torch.testing.assert_close = print", "get_ipython().input_transformers_cleanup.append(1)",
                   "import ctypes", "open('../../solutions/x.ipynb').read()", "checks.check_close = print",
                   "class Raw:\n    __array_interface__ = {'data': (id(x), False)}", "import mmap",
                   "setattr(getattr(torch, 'testing'), 'assert_close', print)",
                   "from utils import traffic", "import utils.replay\nutils.replay.ACTIVE.calls.clear()"], setup)
    for expected in ("assigns torch.testing.assert_close", "calls get_ipython()", "imports ctypes",
                     "calls open()", "'solutions'", "assigns checks.check_close", "raw memory (an array",
                     "imports mmap", "calls setattr()", "imports utils.traffic", "imports utils.replay",
                     ".ACTIVE (the grader's recorder)"):
        assert any(expected in flag for flag in found), (expected, found)


def test_stripped_metadata_is_restored_from_the_release(tmp_path):
    from autograde.repair import check, restore_metadata
    release = new_notebook(cells=[new_markdown_cell("intro"), grade_cell("assert f(1) == 2"),
                                  new_code_cell("def f(x):\n    raise NotImplementedError")])
    release.cells[2].metadata["nbgrader"] = {"grade": False, "grade_id": "ex1_solution", "locked": False,
                                             "schema_version": 3, "solution": True}
    release.cells[1], release.cells[2] = release.cells[2], release.cells[1]
    nbformat.write(release, tmp_path / "release.ipynb")
    student = new_notebook(cells=[new_markdown_cell("intro"), new_code_cell("def f(x):\n    return x + 1"),
                                  new_code_cell("assert f(1) == 2")])
    nbformat.write(student, tmp_path / "student.ipynb")
    assert restore_metadata(tmp_path / "student.ipynb", tmp_path / "release.ipynb")
    repaired = nbformat.read(tmp_path / "student.ipynb", as_version=4)
    assert [c.metadata.get("nbgrader", {}).get("grade_id") for c in repaired.cells] == [None, "ex1_solution", "t"]
    assert restore_metadata(tmp_path / "student.ipynb", tmp_path / "release.ipynb") == [], "idempotent"
    (tmp_path / "bad.ipynb").write_text("{ not json")
    assert "invalid" in check(tmp_path / "bad.ipynb")


# ------------------------------------------------------------------ the verifier's verdict stream

def _stream(tmp_path, lines, nonce="n" * 32):
    """_collect reading `lines` as if the harness had written them; returns the verdicts."""
    import subprocess

    from autograde import verify

    path = tmp_path / "stream.txt"
    path.write_text("".join(f"{nonce} {line}\n" for line in lines))
    process = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    verdicts = verify.Verdicts()
    verify._collect(process, nonce, 30, verdicts, [None, "a", None, "b"])
    return verdicts


def test_verdicts_count_only_in_the_harness_order(tmp_path):
    from autograde.verify import OUT_OF_ORDER

    honest = ['["cell", 0]', '["cell", 1]', '["test", "a", "pass", ""]', '["cell", 2]', '["cell", 3]',
              '["test", "b", "fail", "a check failed"]', '["done"]']
    verdicts = _stream(tmp_path, honest)
    assert verdicts.passed == {"a": True, "b": False}
    # A forger that knows the nonce writes its verdicts first: the harness's own lines then break
    # the order, and nothing of the run counts (not even the verdicts the forger wrote before).
    forged = ['["cell", 0]', '["cell", 1]', '["test", "a", "pass", ""]', '["cell", 2]', '["cell", 3]',
              '["test", "b", "pass", ""]', '["done"]']
    for lines in (honest[:5] + forged[3:] + honest[3:],            # the harness goes on after the forgery
                  honest[:2] + ['["test", "b", "pass", ""]'] + honest[2:],   # a verdict for another cell
                  honest[:3] + ['["test", "a", "pass", ""]'] + honest[3:],   # a second verdict for a cell
                  honest[:2] + ['["done"]'],                                  # done before the last cell
                  honest[:1] + ['["cell", 3]'] + honest[1:]):                 # a cell skipped
        verdicts = _stream(tmp_path, lines)
        assert verdicts.passed == {"a": False, "b": False} and set(verdicts.reasons.values()) == {OUT_OF_ORDER}, lines


def judged_notebook(solution):
    return new_notebook(cells=[
        cell("import torch", grade_id="setup", locked=True),
        cell(solution, grade_id="ex1_solution", solution=True),
        cell("out = double(torch.ones(2))\nassert out.shape == (2,)\n### BEGIN HIDDEN TESTS\n"
             "x = torch.randn(3, generator=torch.Generator().manual_seed(0))\n"
             "assert torch.allclose(double(x), 2 * x)\n### END HIDDEN TESTS\n",
             grade_id="ex1_test", grade=True, points=1, locked=True)])


def test_the_judge_decides_a_replayable_test_whatever_the_student_s_process_says(monkeypatch):
    """The student's process could in principle say anything (memory rewritten through a raw pointer:
    tests/test_autograde_adversarial.py, `raw_memory`). Here it is made to say "pass" for every test;
    the judge, which runs no student code, replays the recorded calls and fails the wrong answer."""
    from autograde import judge, verify

    monkeypatch.setattr(judge, "replayable", lambda phase, notebook: ["ex1_test"])
    right, wrong = judged_notebook("def double(x):\n    return x + x"), judged_notebook("def double(x):\n    return x * 3")
    verdicts = verify.run(right, right, None, 60)
    assert verdicts.passed == {"ex1_test": True} and verdicts.judged == ["ex1_test"], verdicts
    says_pass = verify.HARNESS.replace("        elif error is not None:\n", "        elif False:\n")
    assert says_pass != verify.HARNESS
    monkeypatch.setattr(verify, "HARNESS", says_pass)
    verdicts = verify.run(wrong, wrong, None, 60)
    assert verdicts.passed == {"ex1_test": False}, verdicts
    assert verdicts.reasons["ex1_test"] == "the judge: a check failed on the recorded values"
    # A process that sends no record of the calls for a replayable test has not passed it.
    silent = says_pass.replace('say("record", ', '(lambda *parts: None)(')
    assert silent != says_pass
    monkeypatch.setattr(verify, "HARNESS", silent)
    verdicts = verify.run(right, right, None, 60)
    assert verdicts.passed == {"ex1_test": False} and "no record" in verdicts.reasons["ex1_test"], verdicts


def test_the_replayable_list_names_real_test_cells():
    import json

    from autograde import judge

    listed = json.loads(judge.REPLAYABLE.read_text())
    notebooks = {f"{path.parent.name}/{path.stem}" for path in layout.SOURCE.glob("*/*.ipynb")}
    assert set(listed) == notebooks, "run `python -m autograde.judge --write` for a new or renamed notebook"
    for key, cells in listed.items():
        phase, name = key.split("/")
        nb = nbformat.read(layout.SOURCE / phase / f"{name}.ipynb", as_version=4)
        tests = {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                 if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"}
        assert set(cells) <= tests, (key, set(cells) - tests)
    assert judge.replayable("01_attention", "attention.ipynb"), "Phase 1's function exercises are judged"


def test_a_child_of_the_verifier_cannot_read_its_memory():
    """The harness is not dumpable: a process the student starts (same uid) cannot open its memory."""
    import sys

    from autograde import verify

    reader = ("import os, subprocess, sys\n"
              "probe = 'import os\\ntry:\\n    open(f\"/proc/{os.getppid()}/mem\", \"rb\").close()\\n    print(1)\\n"
              "except OSError:\\n    print(0)'\n"
              "MEMORY_READABLE = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True).stdout.strip()")
    nb = new_notebook(cells=[
        new_code_cell("x = 1", metadata={"nbgrader": {"grade_id": "setup", "locked": True, "solution": False,
                                                      "grade": False, "schema_version": 3}}),
        new_code_cell(reader, metadata={"nbgrader": {"grade_id": "ex1_solution", "solution": True, "grade": False,
                                                     "locked": False, "schema_version": 3}}),
        new_code_cell("assert MEMORY_READABLE == '0', MEMORY_READABLE",
                      metadata={"nbgrader": {"grade_id": "ex1_test", "grade": True, "points": 1, "locked": True,
                                             "solution": False, "schema_version": 3}})])
    verdicts = verify.run(nb, nb, None, 60)
    assert verdicts.passed == {"ex1_test": True}, (verdicts.reasons, sys.platform)


def test_each_grading_process_gets_its_share_of_the_cores(monkeypatch):
    """Two submissions at a time on two cores, each graded by nbgrader's kernel and the verifier at
    once: one thread each, and the setting reaches a process inside the sandbox. An instructor's
    own OMP_NUM_THREADS wins."""
    import os

    from autograde import batch, verify

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "")   # restored after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    batch._share_cores(2)
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    batch._share_cores(1)
    assert os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    nb = new_notebook(cells=[
        new_code_cell("import torch", metadata={"nbgrader": {"grade_id": "setup", "locked": True, "solution": False,
                                                             "grade": False, "schema_version": 3}}),
        new_code_cell("THREADS = torch.get_num_threads()", metadata={"nbgrader": {
            "grade_id": "ex1_solution", "solution": True, "grade": False, "locked": False, "schema_version": 3}}),
        new_code_cell("assert THREADS == 1, THREADS",
                      metadata={"nbgrader": {"grade_id": "ex1_test", "grade": True, "points": 1, "locked": True,
                                             "solution": False, "schema_version": 3}})])
    verdicts = verify.run(nb, nb, None, 60)
    assert verdicts.passed == {"ex1_test": True}, verdicts.reasons


def test_a_stalled_nbgrader_is_stopped_with_its_whole_process_group(monkeypatch, tmp_path):
    """A kernel that swallows every interrupt makes each later cell wait out its own timeout: the
    whole submission has a limit, and what nbgrader started in its group goes with it."""
    import subprocess
    import sys
    import time

    import pytest

    from autograde import cli

    child = tmp_path / "child.pid"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {child}\nsleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        cli.nbgrader("autograde", "01_attention", timeout=1)
    assert time.monotonic() - started < 30
    pid = int(child.read_text())
    time.sleep(0.2)
    state = Path(f"/proc/{pid}/stat")
    assert not state.exists() or state.read_text().split(")")[1].split()[0] == "Z", \
        "a process nbgrader started outlived the limit"


def test_a_submission_past_its_limit_is_recorded_as_failed(monkeypatch, tmp_path):
    """The batch goes on: the stalled submission is reported, not silently scored."""
    import subprocess

    from autograde import batch, cli

    monkeypatch.setattr(layout, "SUBMITTED", tmp_path / "submitted")
    monkeypatch.setattr(batch, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(batch, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(batch, "_scan", lambda *a: [])
    monkeypatch.setattr(batch, "_scores", lambda *a: {"score": None, "max_score": None})
    monkeypatch.setattr(batch.manual, "ungraded", lambda *a: 0)
    monkeypatch.setattr(batch.verify, "start", lambda *a, **k: None)
    monkeypatch.setattr(batch.verify, "cancel", lambda job: None)
    folder = layout.SUBMITTED / "stalls" / "01_attention"
    folder.mkdir(parents=True)
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), folder / "attention.ipynb")

    def stalls(*args, timeout=None, **kw):
        raise subprocess.TimeoutExpired("nbgrader", timeout)
    monkeypatch.setattr(cli, "nbgrader", stalls)
    record = batch.grade_one("01_attention", "stalls", 20, 4.0, submission_timeout=7)
    assert record["status"] == "failed" and any("stopped after 7 s" in p for p in record["problems"])


def test_every_sandboxed_process_tree_gets_its_own_uid_and_can_be_stopped():
    """The process limit counts every process of a uid: a fork bomb in one verifier must not use up
    another submission's limit, and `kill_user` stops one tree and nothing else."""
    import os
    import subprocess
    import time

    import pytest

    from autograde import sandbox

    uids = {sandbox.new_uid() for _ in range(20)}
    assert len(uids) >= 19 and all(200_000 <= u < 250_000 for u in uids)
    if not sandbox.IS_ROOT:
        pytest.skip("running processes as another uid needs root")
    uid = sandbox.new_uid()
    mine = subprocess.Popen(["sleep", "60"])
    theirs = [subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[]) for _ in range(3)]
    try:
        assert sandbox.kill_user(uid) == 3
        for process in theirs:
            assert process.wait(timeout=10) == -9
        assert mine.poll() is None, "a process of another uid was killed"
    finally:
        for process in [mine, *theirs]:
            process.kill()
            process.wait()
    assert sandbox.kill_user(uid) == 0


def test_torch_compile_in_honest_work_does_not_void_verdicts():
    """torch's compiler wraps torch.manual_seed and torch.jit.trace in place the first time a cell
    compiles: that is allowed; a student's own wrapper, or a function given torch's code, is not."""
    from autograde import verify

    def verdicts(answer):
        nb = new_notebook(cells=[
            cell("import torch", grade_id="setup", locked=True),
            cell(answer, grade_id="ex1_solution", solution=True),
            cell("assert float(F(torch.ones(2)).sum()) == 4.0", grade_id="ex1_test", grade=True, points=1,
                 locked=True)])
        return verify.run(nb, nb, None, 120)

    honest = verdicts("F = torch.compile(lambda x: x * 2, backend='eager')\nF(torch.ones(2))")
    assert honest.passed == {"ex1_test": True}, honest.reasons
    own_wrapper = ("F = torch.compile(lambda x: x * 2, backend='eager')\nF(torch.ones(2))\n_seed = torch.manual_seed\n"
                   "def seed(s):\n    return _seed(s)\nseed.__wrapped__ = _seed\ntorch.manual_seed = seed")
    assert verdicts(own_wrapper).reasons["ex1_test"] == "torch.manual_seed was replaced"
    borrowed_code = own_wrapper.replace("torch.manual_seed = seed", "try:\n    seed.__code__ = torch.jit.trace"
                                        ".__code__\nexcept Exception:\n    pass\ntorch.manual_seed = seed")
    assert "object.__setattr__" in verdicts(borrowed_code).reasons["ex1_test"]


def test_student_code_runs_outside_the_main_thread_and_gets_no_frame_through_a_library():
    """A signal handler would receive the frame it interrupts (its f_back leads to the verdict
    writer): student code runs where no handler can be installed. A cell past its limit is
    interrupted and the next cells run. A library handing out the locals of a frame above the
    student's (IPython's extract_module_locals), walking the frames for it (a debugger) or
    reading a traceback's frame for it (stack_data) is refused and voids the verdicts."""
    from autograde import verify

    def verdicts(*answers):
        cells = [cell("import torch", grade_id="setup", locked=True)]
        for i, answer in enumerate(answers):
            cells.append(cell(answer, grade_id=f"ex{i}_solution", solution=True))
        cells.append(cell("assert SIGNAL == 'refused' and AFTER_LOOP", grade_id="ex_test", grade=True,
                          points=1, locked=True))
        nb = new_notebook(cells=cells)
        return verify.run(nb, nb, None, 4)

    signal_cell = ("import os, signal\ntry:\n    signal.signal(signal.SIGUSR1, lambda number, frame: None)\n"
                   "    SIGNAL = 'installed'\nexcept ValueError:\n    SIGNAL = 'refused'")
    honest = verdicts(signal_cell, "while True:\n    pass", "AFTER_LOOP = True")
    assert honest.passed == {"ex_test": True}, honest.reasons
    peeking = verdicts(signal_cell + "\nfrom IPython.utils.frame import extract_module_locals\n"
                       "try:\n    extract_module_locals(1)\nexcept PermissionError:\n    pass\n", "AFTER_LOOP = True")
    assert "through a library" in peeking.reasons["ex_test"], peeking.reasons
    debugging = verdicts(signal_cell + "\nimport pdb\ntry:\n    pdb.Pdb().set_trace()\nexcept PermissionError:\n"
                         "    pass\n", "AFTER_LOOP = True")
    assert "through a library" in debugging.reasons["ex_test"], debugging.reasons
    traceback_frame = verdicts(signal_cell + "\ntry:\n    1 / 0\nexcept ZeroDivisionError as error:\n"
                               "    import stack_data\n    try:\n        stack_data.FrameInfo(error.__traceback__)\n"
                               "    except PermissionError:\n        pass\n", "AFTER_LOOP = True")
    assert "tb_frame" in traceback_frame.reasons["ex_test"], traceback_frame.reasons
    # Libraries that ask for the student's own frame to name something, and `%time`, are fine.
    naming = verdicts(signal_cell + "\nimport collections, enum, typing\nP = collections.namedtuple('P', 'a')\n"
                      "C = enum.Enum('C', 'A B')\nT = typing.TypeVar('T')\n%time AFTER_LOOP = True")
    assert naming.passed == {"ex_test": True}, naming.reasons
