"""One line that says which machine a benchmark ran on, for every benchmark script to print first."""

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """Cores, CPU model, load average now (a busy machine slows every figure) and Python version."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {os.cpu_count()} cores ({cpu_model()}), load average {load:.2f}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")
