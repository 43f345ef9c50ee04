"""Shared fixtures: the real embedded model and the real XTREME data."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "xtreme"
os.environ.setdefault("RAYSPARSE_DATA", str(DEFAULT_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A test that uses any of these (directly or through another fixture) starts Ray or an MLflow server:
# it is marked slow, so `make test-quick` (pytest -m "not slow") leaves it out. Tests that run a
# notebook, or train, evaluate or benchmark e5 on real data carry the mark themselves.
SLOW_FIXTURES = {"local_cluster", "ray_local", "tracking_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
def local_cluster():
    """A real multi-node Ray cluster on loopback, shaped as clusters/local.yaml (a head of 2 CPUs and
    two workers of 1 CPU), each node a `ray start` process of its own; free ports and its own temp
    dir, so other Ray instances on the machine are neither found nor touched."""
    from raysparse.cluster import LocalCluster, LocalClusterSpec
    from raysparse.config import load_spec

    spec = load_spec(REPO / "clusters" / "local.yaml", LocalClusterSpec)
    cluster = LocalCluster(spec.model_copy(update={"port": None, "dashboard_port": None, "temp_dir": None})).start()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_local(local_cluster):
    """The session's Ray: this process is a driver of ``local_cluster``, shared by the tests that need Ray."""
    import ray

    from raysparse.runner import ensure_ray

    ensure_ray(local_cluster.address)
    # Subprocesses (CLI drivers, notebook kernels) join this cluster instead of starting a second
    # one on the same machine: one Ray per machine, and a killed driver leaves the cluster up.
    os.environ["RAY_ADDRESS"] = local_cluster.address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, data_dir, embedded_dir) -> Path:
    """A tiny random BERT with the real (trimmed) tokenizer: trials that cost Ray's time, not the model's."""
    from raysparse.models.tiny import make_tiny_encoder

    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-model"), languages=("en", "de"))
