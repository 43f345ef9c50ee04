"""Shared fixtures: the real embedded model and the real XTREME data."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "xtreme"
os.environ.setdefault("RAYSPARSE_DATA", str(DEFAULT_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["RAYSPARSE_DATA"])
    if not path.is_dir():
        pytest.fail(f"XTREME data not found at {path}; set RAYSPARSE_DATA")
    return path


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from raysparse.models.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_dir):
    import raysparse

    return raysparse.load_tokenizer(str(embedded_dir))


@pytest.fixture()
def embedded_model(embedded_dir):
    """A fresh copy per test (tests shrink it in place)."""
    import raysparse

    return raysparse.load_model(str(embedded_dir))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, two threads that wait on each
    other run several times slower than one (measured: 5x under a load of 10)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory):
    """A real MLflow server (SQLite, served artifacts) on 127.0.0.1 for the whole session."""
    from raysparse.tracking.server import start_server, stop_server

    root = tmp_path_factory.mktemp("mlflow")
    uri = start_server(root)
    yield uri
    stop_server(root)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (dashboard on, loopback) shared by the tests that need one."""
    import ray

    from raysparse.runner import ensure_ray

    ensure_ray(num_cpus=4)
    # Subprocesses (CLI drivers, notebook kernels) join this cluster instead of starting a second
    # one on the same machine: one Ray per machine, and a killed driver leaves the cluster up.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
