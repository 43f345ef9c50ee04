"""A local MLflow tracking server that raysparse starts once and then reuses.

SQLite behind `mlflow server` (the file store is deprecated), artifacts served over
HTTP so workers on other nodes can upload, bound to 127.0.0.1 unless the user says
otherwise. The server outlives the command that started it: a later run, the MLflow UI
and notebooks all talk to the same one. Its address is kept in ``<root>/server.json``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from raysparse.errors import RaysparseError

STATE_FILE = "server.json"


def default_root() -> Path:
    return Path(os.environ.get("RAYSPARSE_MLFLOW_ROOT", "mlflow-server")).resolve()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _read_state(root: Path) -> dict | None:
    try:
        return json.loads((root / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def running_server(root: Path | None = None) -> str | None:
    """URI of the server recorded under ``root`` if it answers, else None."""
    state = _read_state(root or default_root())
    if state and is_healthy(state["uri"]):
        return state["uri"]
    return None


def start_server(root: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = 90.0) -> str:
    """Start ``mlflow server`` detached (its own session) and wait until it answers."""
    root = (root or default_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    uri = f"http://{host}:{port}"
    log = open(root / "server.log", "ab")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
               "--host", host, "--port", str(port), "--workers", "1"]
    # MLflow's job runner (GenAI jobs: three extra worker processes, ~0.7 GB) serves nothing raysparse logs.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true", **os.environ}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, cwd=root, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RaysparseError(f"tracking: mlflow server exited with status {process.returncode}; see {root / 'server.log'}")
        if is_healthy(uri, timeout=1.0):
            (root / STATE_FILE).write_text(json.dumps({"uri": uri, "pid": process.pid, "root": str(root)}))
            return uri
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    raise RaysparseError(f"tracking: mlflow server did not answer on {uri} within {timeout:.0f}s; see {root / 'server.log'}")


def ensure_server(root: Path | None = None, host: str = "127.0.0.1", port: int | None = None) -> str:
    """The URI of the local server (and of its UI), starting it on ``host``:``port`` if none is running."""
    return running_server(root) or start_server(root, host, port)


def stop_server(root: Path | None = None, timeout: float = 30.0) -> bool:
    """Signal the server's process group (its job workers follow) and wait until it is gone;
    SIGKILL what is left after ``timeout``. True if one was running."""
    root = root or default_root()
    state = _read_state(root)
    if not state:
        return False
    pid = state["pid"]
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    finally:
        (root / STATE_FILE).unlink(missing_ok=True)
    deadline = time.time() + timeout
    while _group_alive(pid):
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    return True


def _group_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)   # reap the leader if this process started it
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def resolve_tracking_uri(configured: str | None) -> str:
    """The user's URI if given (or MLFLOW_TRACKING_URI), else the local server's."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("http") and not is_healthy(uri):
            raise RaysparseError(f"tracking.uri: no MLflow server answers at {uri} (expected /health to return 200)")
        return uri
    return ensure_server()
