"""A throwaway JupyterLab server for the browser test.

Everything the server could write about the user (config, runtime files, workspaces, settings,
IPython history) goes to a temporary folder, so a test run never touches the user's Jupyter.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The user-level settings the test needs: no "Jupyter news?" pop-up over the screenshots, and no
# check for updates (there is no internet to ask).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


@dataclass
class Lab:
    url: str  # base URL, ends with "/"
    token: str
    root_dir: Path  # the folder the server serves: notebooks are opened relative to it
    log: Path

    def lab_url(self) -> str:
        return f"{self.url}lab?reset&token={self.token}"

    def notebook_url(self, relative_path: str) -> str:
        # `reset` drops the workspace JupyterLab would restore (the tabs of a previous page).
        return f"{self.url}lab/tree/{relative_path}?reset&token={self.token}"


def _server_info(runtime_dir: Path, pid: int) -> dict | None:
    """The file the server writes once it listens (it names the port the OS gave it)."""
    path = runtime_dir / f"jpserver-{pid}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or half written
        return None


@contextlib.contextmanager
def running_jupyterlab(root_dir: Path, state_dir: Path, start_timeout: float = 120, cwd: Path = ROOT):
    """Start ``jupyter lab`` serving ``root_dir``; yield a :class:`Lab`; stop it and its kernels.

    The server runs from ``cwd``, the repository root unless told otherwise, because nbgrader (the
    Validate button, Formgrader) reads ``nbgrader_config.py`` from the server's working folder:
    Formgrader on a temporary course runs from that course's root, which must be inside ``root_dir``.
    """
    dirs = {name: state_dir / name for name in ("config", "data", "runtime", "workspaces",
                                                "settings", "ipython")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    for name, settings in LAB_SETTINGS.items():
        target = dirs["settings"] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(settings))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
        "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
        "IPYTHONDIR": str(dirs["ipython"]),
    }
    token = secrets.token_hex(24)
    command = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port=0",  # the OS picks a free port; the server info file tells which
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp, to run cells and read state
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log = state_dir / "jupyterlab.log"
    with open(log, "wb") as log_file:
        # Its own session, so that the whole process group can be stopped at the end.
        server = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while (info := _server_info(dirs["runtime"], server.pid)) is None:
            if server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {server.returncode}; "
                                   f"see {log}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not start in {start_timeout} s; see {log}")
            time.sleep(0.2)  # polling for the info file, not waiting a fixed time
        yield Lab(url=info["url"], token=token, root_dir=root_dir, log=log)
    finally:
        _stop(server)


def _stop(server: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM first: the server then shuts its kernels down (they run in sessions of their own,
    out of reach of the process-group kill). SIGKILL the group if it does not exit in time."""
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Anything left in the group (the server, or children it failed to stop) goes now.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()
