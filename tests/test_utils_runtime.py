import torch

from utils import runtime


def test_grading_is_detected_from_nbgraders_variable(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    assert not runtime.is_grading()
    for mode in ("autograde", "validate"):
        monkeypatch.setenv("NBGRADER_EXECUTION", mode)
        assert runtime.is_grading()


def test_choose_picks_the_size_for_the_situation(monkeypatch):
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.choose(cpu=100, gpu=1000, grading=5) == 100
    monkeypatch.setenv("COURSE_DEVICE", "cuda")  # pretend: choose() only reads the device type
    assert runtime.choose(cpu=100, gpu=1000, grading=5) == 1000
    assert runtime.choose(cpu=100) == 100
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert runtime.choose(cpu=100, gpu=1000, grading=5) == 5
    assert runtime.choose(cpu=100, gpu=1000) == 100


def test_device_order_and_override(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert runtime.get_device().type == expected
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert runtime.get_device() == torch.device("cpu")


def test_seeding_repeats_every_generator():
    import random

    import numpy as np

    runtime.seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    runtime.seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_progress_is_silent_while_grading(monkeypatch, capsys):
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    assert list(runtime.progress(range(3))) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("NBGRADER_EXECUTION")
    list(runtime.progress(range(3), desc="visible"))
    assert "visible" in capsys.readouterr().err


def test_setup_notebook_reports_in_plain_words(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    monkeypatch.setenv("NBGRADER_EXECUTION", "validate")
    assert runtime.setup_notebook(seed=1) == torch.device("cpu")
    report = capsys.readouterr().out
    assert "Running on the CPU" in report and "torch" in report and "shrunk or skipped" in report


def test_importing_utils_spares_notebooks_the_iri_grammar():
    """plotly imports nbformat, nbformat imports jsonschema, and jsonschema builds a grammar for an
    optional IRI check (2 s) if `rfc3987_syntax` can be imported: every notebook, grading kernel,
    verifier and nbgrader process starts with `import utils`, which must prevent it."""
    import subprocess
    import sys

    code = ("import utils, nbformat, jsonschema, sys; "
            "print('rfc3987_syntax' in sys.modules and sys.modules['rfc3987_syntax'] is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
