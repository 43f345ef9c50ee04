"""A Ray cluster of several nodes on one machine, loopback only: for examples, tests and benchmarks.

Every node is a ``ray start --block`` process that this object owns, so removing a node
signals exactly that process (its Ray processes die with it); nothing here ever runs
``ray stop``, which would stop every Ray instance on the machine. The cluster keeps its
files (sessions, logs, ``ray_current_cluster``) in its own temp dir and takes free ports,
so it neither finds nor disturbs other Ray clusters running beside it. The dashboard, the
GCS and every node use ``host`` (127.0.0.1 unless the spec says otherwise), and token
authentication is on, as for a cluster started by ``ray.init()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from raysparse.config import Strict, load_spec
from raysparse.errors import RaysparseError

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "clusters" / "local.yaml"


class NodeSpec(Strict):
    num_cpus: int = Field(1, ge=0)              # logical CPUs; may exceed the cores (tasks share them)
    num_gpus: int = Field(0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    object_store_mb: int = Field(200, ge=80)


class LocalClusterSpec(Strict):
    """``clusters/local.yaml``: a head and worker nodes, all on ``host``."""

    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)             # GCS; None: a free port
    dashboard_port: int | None = Field(None, ge=1, le=65535)   # None: a free port
    temp_dir: str | None = None                                 # None: a fresh folder under /tmp
    auth: Literal["token", "disabled"] = "token"
    head: NodeSpec = Field(default_factory=lambda: NodeSpec(num_cpus=2))
    workers: list[NodeSpec] = Field(default_factory=lambda: [NodeSpec(), NodeSpec()])


@dataclass
class LocalNode:
    name: str
    spec: NodeSpec
    process: subprocess.Popen
    log: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """Start with :meth:`start` (or ``with LocalCluster(spec) as cluster``); ``address`` is the GCS."""

    spec: LocalClusterSpec = field(default_factory=LocalClusterSpec)
    nodes: list[LocalNode] = field(default_factory=list)
    address: str = ""
    dashboard_url: str = ""
    temp_dir: Path | None = None
    _owns_temp_dir: bool = False
    _count: int = 0

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_SPEC) -> "LocalCluster":
        return cls(load_spec(path, LocalClusterSpec))

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "LocalCluster":
        spec = self.spec
        if spec.temp_dir:
            self.temp_dir = Path(spec.temp_dir).expanduser().resolve()
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        else:   # short: Ray's socket paths live under it (unix sockets allow ~107 characters)
            self.temp_dir, self._owns_temp_dir = Path(tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")), True
        port = spec.port or _free_port(spec.host)
        dashboard_port = spec.dashboard_port or _free_port(spec.host)
        self.address = f"{spec.host}:{port}"
        self.dashboard_url = f"http://{spec.host}:{dashboard_port}"
        _prepare_auth(spec.auth)
        head = ["--head", "--port", str(port), "--include-dashboard=True", "--dashboard-host", spec.host,
                "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(_free_port(spec.host))]
        try:
            self._start_node("head", spec.head, head, timeout)
            for worker in spec.workers:
                self.add_node(worker, timeout=timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    def add_node(self, node: NodeSpec | None = None, timeout: float = 120.0) -> LocalNode:
        """Join one more node (it shares the head's session folder, so no log monitor of its own)."""
        return self._start_node(f"worker-{self._count}", node or NodeSpec(),
                                ["--address", self.address, "--include-log-monitor=False"], timeout)

    def remove_node(self, node: LocalNode, graceful: bool = False, timeout: float = 60.0) -> None:
        """Stop one node: SIGKILL (a crashed machine) or SIGTERM (a drained one). Its Ray processes follow."""
        if node.alive:
            node.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                node.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=10)
        if node in self.nodes:
            self.nodes.remove(node)

    def shutdown(self) -> None:
        for node in reversed(list(self.nodes)):
            self.remove_node(node, graceful=True)
        if self._owns_temp_dir and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start() if not self.nodes else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- nodes ------------------------------------------------------------------------------
    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id} of the live nodes (needs a connected driver: ``ray.init(address)``)."""
        import ray

        names = {n.name for n in self.nodes}
        return {n["NodeName"]: n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeName"] in names}

    def _start_node(self, role: str, node: NodeSpec, extra: list[str], timeout: float) -> LocalNode:
        host = self.spec.host
        name = f"rs-{role}-{os.getpid()}-{self._count}"
        self._count += 1
        command = [str(Path(sys.executable).with_name("ray")), "start", "--block", *extra,
                   "--node-ip-address", host, "--node-name", name, "--temp-dir", str(self.temp_dir),
                   "--num-cpus", str(node.num_cpus), "--num-gpus", str(node.num_gpus),
                   "--object-store-memory", str(node.object_store_mb * 1024 * 1024),
                   "--dashboard-agent-listen-port", str(_free_port(host)),
                   "--metrics-export-port", str(_free_port(host)),
                   "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
        if node.resources:
            import json

            command += ["--resources", json.dumps(node.resources)]
        log = self.temp_dir / f"{name}.log"
        process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=_node_env(), start_new_session=True)
        handle = LocalNode(name, node, process, log)
        self.nodes.append(handle)
        self._wait_alive(handle, timeout)
        return handle

    def _wait_alive(self, node: LocalNode, timeout: float) -> None:
        """The node counts once ``ray start`` says so and the GCS lists it alive."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not node.alive:
                tail = node.log.read_text(errors="replace")[-2000:]
                raise RaysparseError(f"cluster: node {node.name} exited with status {node.process.returncode}:\n{tail}")
            if "--block" in node.log.read_text(errors="replace") and node.name in _alive_node_names(self.address):
                return
            time.sleep(0.5)
        raise RaysparseError(f"cluster: node {node.name} did not join within {timeout:.0f}s; see {node.log}")


def _alive_node_names(address: str) -> set[str]:
    """Names of the nodes the GCS lists alive (asked without connecting a driver)."""
    try:
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        nodes = GcsClient(address=address).get_all_node_info(timeout=5, state_filter=GcsNodeInfo.GcsNodeState.ALIVE)
        return {info.node_name for info in nodes.values()}
    except Exception:   # the GCS is not up yet
        return set()


def _node_env() -> dict[str, str]:
    """Nodes run this process's environment; ``raysparse`` and ``ray`` resolve to this venv."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_ADDRESS", None)
    return env


def _prepare_auth(mode: str) -> None:
    """Token auth on (Ray's default for local clusters): make sure a token exists, and use it here too."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")           # this process's Ray config reads the mode again
    if mode != "token":
        return

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    if not loader.has_token(ignore_auth_mode=True):
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()
        loader.reset_cache()


def serve(path: str | Path = DEFAULT_SPEC) -> None:
    """``raysparse cluster``: start the cluster, print how to use it, keep it up until Ctrl-C."""
    cluster = LocalCluster.from_yaml(path)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    cluster.start()
    try:
        cpus = cluster.spec.head.num_cpus + sum(w.num_cpus for w in cluster.spec.workers)
        print(f"Ray cluster up: {len(cluster.nodes)} nodes, {cpus} CPUs, temp dir {cluster.temp_dir}\n"
              f"  address   {cluster.address}        (RAY_ADDRESS for raysparse run/search --address)\n"
              f"  dashboard {cluster.dashboard_url}   (jobs: RAY_AUTH_MODE=token ray job submit --address "
              f"{cluster.dashboard_url} --working-dir . -- raysparse search SPEC)\n"
              f"  or:       raysparse submit SPEC --address {cluster.dashboard_url}\n"
              "Ctrl-C stops it.", flush=True)
        while not stop["now"] and all(n.alive for n in cluster.nodes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()


__all__ = ["LocalCluster", "LocalClusterSpec", "LocalNode", "NodeSpec", "serve"]
