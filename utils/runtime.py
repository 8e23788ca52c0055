"""Where the notebook is running, and how much work it should do there.

Every notebook starts with ``device = setup_notebook()``. After that:

* ``get_device()`` picks the fastest device: an NVIDIA GPU (``cuda``), then an
  Apple GPU (``mps``), then the ``cpu``.
* ``is_grading()`` is true while nbgrader runs the notebook (autograding or
  validating). Heavy demonstration cells then shrink or skip, so that grading
  stays fast and only the graded exercises count.
* ``choose(cpu=..., gpu=..., grading=...)`` picks a size for a demo: the big one
  on a GPU, a laptop-sized one on a CPU, a tiny one while grading.
* ``progress(iterable)`` is a tqdm progress bar that stays silent while grading
  (nbgrader scores a test cell 0 if anything is written to stderr, and progress
  bars write to stderr).
"""

from __future__ import annotations

import importlib
import os
import platform
import random
import sys

import numpy as np
import torch


def is_grading() -> bool:
    """True while nbgrader executes the notebook (``nbgrader autograde``,
    ``nbgrader validate`` or the Validate button).

    nbgrader announces itself through the ``NBGRADER_EXECUTION`` environment
    variable ("autograde" or "validate"); it is unset when you run cells yourself.
    """
    return bool(os.environ.get("NBGRADER_EXECUTION"))


def get_device() -> torch.device:
    """The fastest device available: ``cuda``, then ``mps``, then ``cpu``.

    Set the environment variable ``COURSE_DEVICE`` (for example to ``cpu``)
    to override the choice.
    """
    forced = os.environ.get("COURSE_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose(cpu, gpu=None, grading=None):
    """Pick the size of a demonstration for the machine it runs on.

    >>> steps = choose(cpu=300, gpu=3000, grading=10)

    ``gpu`` defaults to ``cpu``, and ``grading`` to ``cpu``.
    """
    if is_grading():
        return cpu if grading is None else grading
    if get_device().type != "cpu" and gpu is not None:
        return gpu
    return cpu


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's random generators so a run repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress(iterable=None, **kwargs):
    """A progress bar (``tqdm``) that draws in the notebook, and stays off while grading.

    Takes the same arguments as ``tqdm.auto.tqdm``, e.g. ``progress(range(100), desc="training")``.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", is_grading())
    return tqdm(iterable, **kwargs)


# The packages every notebook relies on, with the name pip installs them under.
_REQUIRED = {"torch": "torch", "numpy": "numpy", "einops": "einops", "plotly": "plotly",
             "ipywidgets": "ipywidgets", "tqdm": "tqdm"}


def describe_environment() -> str:
    """A short, plain-words report: device, library versions, anything missing and how to fix it."""
    device = get_device()
    kind = {"cuda": "an NVIDIA GPU", "mps": "an Apple GPU", "cpu": "the CPU"}[device.type]
    if device.type == "cuda":
        kind += f" ({torch.cuda.get_device_name(device)})"
    lines = [f"Running on {kind}; Python {platform.python_version()}."]
    versions, missing = [], []
    for module, package in _REQUIRED.items():
        try:
            versions.append(f"{module} {importlib.import_module(module).__version__}")
        except ImportError:
            missing.append(package)
    lines.append("Libraries: " + ", ".join(versions) + ".")
    if missing:
        lines.append(f"Missing: {', '.join(missing)}. Fix: run `make lab` from the course folder, "
                     f"or `{sys.executable} -m pip install {' '.join(missing)}`.")
    if is_grading():
        lines.append("nbgrader is running this notebook: demonstrations are shrunk or skipped.")
    return "\n".join(lines)


def setup_notebook(seed: int = 0) -> torch.device:
    """The first cell of every notebook: seed everything, print the environment, return the device."""
    seed_everything(seed)
    if is_grading():
        # Nobody looks at the figures of a graded copy: send plotly's figure data only, without the
        # 3.5 MB of plotly.js its notebook renderer embeds (JupyterLab draws either; grading saves seconds).
        import plotly.io

        plotly.io.renderers.default = "plotly_mimetype"
    print(describe_environment())
    return get_device()
