"""Ray Jobs: submit ``raysparse run|search SPEC`` to a running cluster and follow its logs.

The job's driver runs on the cluster (the head node) in a copy of ``working_dir``, so the
spec must lie inside it; the spec is checked here first, so a bad field fails before
anything is uploaded. Results reach a shared MLflow server: the spec's ``tracking.uri``,
else ``tracking_uri`` or MLFLOW_TRACKING_URI, handed to the job as MLFLOW_TRACKING_URI (a
job has no local server to fall back on: the head node's would vanish with the job).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from raysparse.errors import RaysparseError, first_line

Kind = Literal["run", "search"]
SUBNETWORKS = "subnetworks"   # kind: of a sub-network search spec, which `raysparse search` runs
SEARCH_KEYS = {"base", "space", "objectives", "num_samples", "max_concurrent", "sampler", "scheduler", "trials"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class JobOutcome:
    job_id: str
    status: str
    entrypoint: str
    message: str = ""


def _fields(path: str | Path) -> dict:
    """A spec file's top-level fields ({} where it cannot be read as a mapping: loading it says why)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def spec_kind(path: str | Path) -> Kind:
    """A search spec has a base and a space (or a budget), or says ``kind: subnetworks``; anything else
    is a run spec."""
    path = Path(path)
    if not path.is_file():
        raise RaysparseError(f"spec: {path} does not exist (expected a YAML file)")
    data = _fields(path)
    return "search" if SEARCH_KEYS & set(data) or data.get("kind") == SUBNETWORKS else "run"


def check_spec(path: str | Path, kind: Kind | None = None, budget: str | None = None, overrides: Sequence[str] = ()):
    """The validated spec, as the job will read it (named budget and ``--set`` overrides applied):
    a RunSpec, a SearchSpec with its space and objectives checked, or (``kind: subnetworks``) a
    SubnetworkSearchSpec."""
    from raysparse.config import RunSpec, load_spec
    from raysparse.search.spec import SearchSpec, check_search
    from raysparse.search.subnetworks import SubnetworkSearchSpec

    kind = kind or spec_kind(path)
    if kind == "search" and _fields(path).get("kind") == SUBNETWORKS:
        return load_spec(path, SubnetworkSearchSpec, budget=budget, overrides=list(overrides))
    spec = load_spec(path, SearchSpec if kind == "search" else RunSpec, budget=budget, overrides=list(overrides))
    if kind == "search":
        check_search(spec)
    return spec


def entrypoint_for(kind: Kind, spec: str, resume: bool = False, budget: str | None = None,
                   overrides: Sequence[str] = ()) -> str:
    """`python -m raysparse.cli`: works where raysparse is installed and where only the working dir has it."""
    words = ["python", "-m", "raysparse.cli", kind, spec, *(["--resume"] if resume else [])]
    words += [*(["--budget", budget] if budget else []), *[w for o in overrides for w in ("--set", o)]]
    return shlex.join(words)


def load_runtime_env(path: str | Path | None) -> dict[str, Any]:
    """A runtime_env YAML (Ray's fields: working_dir, pip, image_uri, env_vars, excludes, ...), validated."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise RaysparseError(f"runtime_env: {path} does not exist (expected a YAML file)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise RaysparseError(f"runtime_env: {path} must hold a mapping of Ray runtime_env fields")
    check_runtime_env(data, str(path))
    return data


def check_runtime_env(data: dict, where: str = "runtime_env") -> None:
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**data)
    except Exception as exc:
        raise RaysparseError(f"runtime_env: {first_line(exc)} (in {where})") from None


def runtime_env_for(working_dir: Path, tracking_uri: str | None, storage: str | None = None,
                    env: dict[str, str] | None = None, base: dict | None = None) -> dict[str, Any]:
    """The job's runtime_env: ``base`` plus the working dir and what raysparse needs in env_vars."""
    runtime_env = dict(base or {})
    runtime_env.setdefault("working_dir", str(working_dir))
    env_vars = dict(runtime_env.get("env_vars") or {})
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    if storage:
        env_vars["RAYSPARSE_STORAGE"] = storage
    env_vars.update(env or {})
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def submit(spec: str | Path, address: str | None = None, working_dir: str | Path = ".",
           kind: Kind | None = None, runtime_env: str | Path | dict | None = None, tracking_uri: str | None = None,
           storage: str | None = None, env: dict[str, str] | None = None, resume: bool = False,
           budget: str | None = None, overrides: Sequence[str] = (), follow: bool = True,
           submission_id: str | None = None,
           out: Callable[[str], None] = lambda line: print(line, end="", flush=True)) -> JobOutcome:
    """Submit one run or search as a Ray job; with ``follow``, stream its logs and wait for the end."""
    from ray.job_submission import JobSubmissionClient

    root = Path(working_dir).expanduser().resolve()
    path = Path(spec).expanduser()
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not root.is_dir():
        raise RaysparseError(f"working_dir: {root} is not a directory")
    if not path.is_relative_to(root):
        raise RaysparseError(f"spec: {path} is outside working_dir {root} (the job only sees the working dir)")
    kind = kind or spec_kind(path)
    checked = check_spec(path, kind, budget, overrides)
    base_env = runtime_env if isinstance(runtime_env, dict) else load_runtime_env(runtime_env)
    configured = checked.tracking_uri if hasattr(checked, "tracking_uri") else checked.tracking.uri
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not (configured or uri or (base_env.get("env_vars") or {}).get("MLFLOW_TRACKING_URI")):
        raise RaysparseError("tracking.uri: a job needs an MLflow server the cluster reaches (set tracking.uri in "
                             "the spec, --tracking-uri or MLFLOW_TRACKING_URI)")
    job_env = runtime_env_for(root, None if configured else uri, storage, env, base_env)
    check_runtime_env(job_env)
    command = entrypoint_for(kind, path.relative_to(root).as_posix(), resume, budget, overrides)
    from raysparse.cluster import enable_client_auth

    enable_client_auth()
    try:
        with _explicit(address):
            client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=command, runtime_env=job_env, submission_id=submission_id,
                                   metadata={"raysparse.kind": kind, "raysparse.spec": path.name})
    except Exception as exc:
        raise RaysparseError(f"address: could not submit to the Ray cluster at {address or 'RAY_ADDRESS'} "
                             f"({first_line(exc)})") from None
    out(f"submitted job {job_id}: {command}\n")
    if not follow:
        status = client.get_job_status(job_id)
        return JobOutcome(job_id, str(getattr(status, "value", status)), command)
    asyncio.run(_follow(client, job_id, out))
    return wait(client, job_id, command)


@contextmanager
def _explicit(address: str | None):
    """Ray lets RAY_ADDRESS (and RAY_API_SERVER_ADDRESS) override a client's address; an explicit one wins here."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {name: os.environ.pop(name) for name in names if address and name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


async def _follow(client, job_id: str, out: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):
        out(lines)


def wait(client, job_id: str, command: str, timeout: float = 60.0) -> JobOutcome:
    """The job's final status (logs end a moment before the status turns terminal)."""
    deadline = time.time() + timeout
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL or time.time() > deadline:
            message = (info.message or "").strip()
            return JobOutcome(job_id, status, command, message.splitlines()[0] if message else "")
        time.sleep(1)


__all__ = ["JobOutcome", "check_runtime_env", "check_spec", "entrypoint_for",
           "load_runtime_env", "runtime_env_for", "spec_kind", "submit"]
