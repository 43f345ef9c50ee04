"""A Ray cluster of several nodes on one machine, loopback only: for examples, tests and benchmarks.

Every node is a ``ray start --block`` process that this object owns, so removing a node
signals exactly that process (its Ray processes die with it); nothing here ever runs
``ray stop``, which would stop every Ray instance on the machine. The cluster keeps its
files (sessions, logs, ``ray_current_cluster``) in its own temp dir and takes free ports,
so it neither finds nor disturbs other Ray clusters running beside it. Each node has a temp
dir of its own, as separate machines would: nodes sharing one session folder delete each
other's copies of a job's working dir (Ray's runtime-env agents manage it per node). The
dashboard listens on ``host`` (127.0.0.1), every node registers with a loopback ``node_ip``,
and token authentication is on, as for a cluster started by ``ray.init()``.
"""

from __future__ import annotations

import json
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
    """``clusters/local.yaml``: a head and worker nodes, all on loopback addresses."""

    host: str = "127.0.0.1"                     # the dashboard (and the jobs API) listens here
    node_ip: str = Field(default_factory=lambda: loopback_node_ip())   # what every node registers as
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


def loopback_node_ip() -> str:
    """A loopback address Ray keeps as a node's address.

    Ray rewrites 127.0.0.1 to the machine's network address (so that other machines could
    join) wherever it allows multi-node clusters; any other address of Linux's loopback
    net 127.0.0.0/8 it keeps. Where it allows none (macOS, Windows), it keeps 127.0.0.1.
    """
    from ray._private import ray_constants

    return "127.0.0.2" if ray_constants.ENABLE_RAY_CLUSTER and sys.platform.startswith("linux") else "127.0.0.1"


def free_port(host: str) -> int:
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
    def from_yaml(cls, path: str | Path = DEFAULT_SPEC) -> LocalCluster:
        return cls(load_spec(path, LocalClusterSpec))

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> LocalCluster:
        spec = self.spec
        if spec.temp_dir:
            self.temp_dir = Path(spec.temp_dir).expanduser().resolve()
            self.temp_dir.mkdir(parents=True, exist_ok=True)
        else:   # short: Ray's socket paths live under it (unix sockets allow ~107 characters)
            self.temp_dir, self._owns_temp_dir = Path(tempfile.mkdtemp(prefix="rs-ray-", dir="/tmp")), True
        port = spec.port or free_port(spec.node_ip)
        dashboard_port = spec.dashboard_port or free_port(spec.host)
        self.address = f"{spec.node_ip}:{port}"
        self.dashboard_url = f"http://{spec.host}:{dashboard_port}"
        _prepare_auth(spec.auth)
        head = ["--head", "--port", str(port), "--include-dashboard=True", "--dashboard-host", spec.host,
                "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(free_port(spec.node_ip))]
        try:
            self._wait_alive(self._launch("head", spec.head, head), timeout)
            workers = [self._launch_worker(worker) for worker in spec.workers]   # they join side by side
            for node in workers:
                self._wait_alive(node, timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    def add_node(self, node: NodeSpec | None = None, timeout: float = 120.0) -> LocalNode:
        """Join one more node; returns once the GCS lists it alive."""
        handle = self._launch_worker(node or NodeSpec())
        self._wait_alive(handle, timeout)
        return handle

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

    def shutdown(self, timeout: float = 60.0) -> None:
        """Workers first (all at once), then the head; SIGKILL what does not stop within ``timeout``."""
        workers = [n for n in self.nodes[1:] if n.alive]
        for node in workers:
            node.process.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for node in workers:
            self.remove_node(node, graceful=True, timeout=max(1.0, deadline - time.time()))
        for node in list(self.nodes):
            self.remove_node(node, graceful=True, timeout=timeout)
        if self._owns_temp_dir and self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start() if not self.nodes else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- nodes ------------------------------------------------------------------------------
    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id} of the live nodes (needs a connected driver: ``ray.init(address)``)."""
        import ray

        names = {n.name for n in self.nodes}
        return {n["NodeName"]: n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeName"] in names}

    def _launch_worker(self, node: NodeSpec) -> LocalNode:
        self._count += 1
        return self._launch(f"worker-{self._count}", node, ["--address", self.address])

    def _launch(self, role: str, node: NodeSpec, extra: list[str]) -> LocalNode:
        host = self.spec.node_ip
        name = f"rs-{os.getpid()}-{role}"
        command = [str(Path(sys.executable).with_name("ray")), "start", "--block", *extra,
                   "--node-ip-address", host, "--node-name", name, "--temp-dir", str(self.temp_dir / role),
                   "--num-cpus", str(node.num_cpus), "--num-gpus", str(node.num_gpus),
                   "--object-store-memory", str(node.object_store_mb * 1024 * 1024),
                   "--dashboard-agent-listen-port", str(free_port(host)),
                   "--metrics-export-port", str(free_port(host)),
                   "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]
        if node.resources:
            command += ["--resources", json.dumps(node.resources)]
        log = self.temp_dir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=_node_env(self.address), start_new_session=True)
        handle = LocalNode(name, node, process, log)
        self.nodes.append(handle)
        return handle

    def _wait_alive(self, node: LocalNode, timeout: float) -> None:
        """The node counts once ``ray start`` says so and the GCS lists it alive."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not node.alive:
                raise RaysparseError(f"cluster: node {node.name} exited with status {node.process.returncode}; "
                                     f"see {node.log}")
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


def _node_env(address: str) -> dict[str, str]:
    """Nodes run this process's environment; ``raysparse`` and ``ray`` resolve to this venv.

    RAY_ADDRESS names this cluster to every process on it: Ray's own helpers (Ray Train's
    placement-group cleaner, the state API) otherwise look for "the" Ray on the machine and
    fail, or pick another one, when several clusters run side by side.

    A node stops at once on SIGTERM (unless the caller's environment says otherwise): Ray's default
    drains it first, waiting up to 30 s for every worker lease to come back so Serve proxies can
    quiesce; a local cluster serves nothing, and after a killed node or worker a lease may never
    return (measured: the head took 31.5 s to stop after the killed-node and killed-worker tests,
    0.9 s without the drain's wait).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_ADDRESS"] = address
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
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


def enable_client_auth() -> None:
    """Send Ray's auth token when one is available and RAY_AUTH_MODE is unset.

    ``ray.init()`` does this by itself only for a cluster it finds on its own, not for an
    explicit address; jobs clients never do.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:   # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def serve(path: str | Path = DEFAULT_SPEC) -> None:
    """``raysparse cluster``: start the cluster, print how to use it, keep it up until Ctrl-C."""
    cluster = LocalCluster.from_yaml(path)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    # Ctrl-C and kill both stop it, also when started in the background, where SIGINT arrives ignored
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
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
        for node in cluster.nodes:
            if not node.alive:
                print(f"node {node.name} stopped (see {node.log}); stopping the cluster", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()


__all__ = ["LocalCluster", "LocalClusterSpec", "LocalNode", "NodeSpec", "enable_client_auth", "free_port", "loopback_node_ip",
           "serve"]
