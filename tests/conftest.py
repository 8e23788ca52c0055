"""Shared test set-up: the versions this run used go in the report header (CI's record)."""

import importlib.metadata
import platform

RECORDED = ("torch", "numpy", "nbgrader", "jupyterlab", "nbclient", "nbconvert", "ipykernel",
            "ipywidgets", "plotly", "einops", "nbmake")


def pytest_report_header(config):
    versions = []
    for name in RECORDED:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    return [f"python {platform.python_version()}; " + ", ".join(versions)]
