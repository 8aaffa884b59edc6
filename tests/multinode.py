"""A multi-node Ray cluster on one machine, for the tests: a head that runs no work and worker nodes on
their own loopback addresses, each in a private mount namespace where /tmp/voldit-node (cache, staging,
temp, home) is its own tmpfs, so no node, and not the driver, sees another's local files."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_ROOT = "/tmp/voldit-node"  # the same path on every node, backed by each node's own tmpfs
NODE_ENV = {"VOLDIT_CACHE": f"{NODE_ROOT}/cache", "TMPDIR": f"{NODE_ROOT}/tmp", "HOME": f"{NODE_ROOT}/home"}
# Ray replaces 127.0.0.1 (and "localhost") by the machine's network address; any other loopback
# address stays, so the whole cluster lives on loopback.
HEAD_IP = "127.0.0.254"
START_ATTEMPTS = 3
# A raylet dies if its dashboard agent or runtime env agent takes more than 15 s to come up, a limit
# fixed in Ray 2.60's raylet (RAY_agent_register_timeout_ms does not change it). Each needs 1-2 s of
# CPU, but on a loaded 2-core machine they miss it; so they start at a higher priority, given back
# once the node is up.
AGENTS = ("/dashboard/agent.py", "ray::DashboardAgent", "/runtime_env/agent/main.py", "ray::RuntimeEnvAgent")
AGENT_NICENESS = -15
# `ray start --head` fails if the dashboard (a process that starts a dozen more) takes over 60 s to come
# up, which it may on a loaded machine; unlike the agents' limit, this one is a setting.
START_ENV = {"RAY_DASHBOARD_STARTUP_TIMEOUT_S": "300"}
WORKER_PORTS = 200  # worker processes (tasks and actors) a node can run at once; each takes a port
# Bytes per node; Ray's default, 30% of the machine's memory, would count the machine once per node.
OBJECT_STORE = 1 << 30
NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)
# GCS health checks: a killed node is declared dead in about 3 s instead of Ray's default 15 s.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
# The mount namespace of each node: /tmp/voldit-node is a fresh tmpfs there. `$@` is the `ray start`
# command; the first line printed is the namespace, by which the node's processes are found later.
NAMESPACE_SCRIPT = (
    f"mount -t tmpfs tmpfs {NODE_ROOT} && mkdir -p {' '.join(NODE_ENV.values())}"
    ' && readlink /proc/$$/ns/mnt && exec "$@"'
)


@dataclass
class Node:
    """One node of the cluster; ``namespace`` is its mount namespace, shared by all its processes."""

    name: str
    ip: str
    resources: dict
    namespace: str
    temp_dir: str
    ports: dict = field(default_factory=dict)
    node_id: str | None = None

    def pids(self) -> list[int]:
        """The node's live processes: those in its mount namespace."""
        return _in_namespaces({self.namespace})

    def log_tail(self, chars: int = 2000) -> str:
        """The raylet's fatal errors and the end of the node's agents' logs, for an error message."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        text = ""
        for log in sorted(logs.glob("raylet.out")) + sorted(logs.glob("*agent*.err")):
            with open(log, errors="replace") as f:
                lines = f.read().splitlines()
            if log.name == "raylet.out":
                lines = [line for line in lines if re.match(r"\[[^\]]* [CF] ", line)]
            text += f"\n--- {log}:\n" + "\n".join(lines)[-chars:]
        return text

    def view(self, path: str) -> Path:
        """``path`` as this node sees it (through one of its processes), e.g. a file under its cache."""
        pids = self.pids()
        if not pids:
            raise RuntimeError(f"node {self.name} has no live process")
        return Path(f"/proc/{pids[0]}/root{path}")


class Cluster:
    """A head (0 CPUs, the dashboard, the GCS) and worker nodes named ``w1``, ``w2``...; each worker
    node carries the resource ``voldit_<name>`` so work can be pinned to it."""

    def __init__(self, workers: int = 2, s3_env: dict | None = None):
        self.workers = workers
        self.token = secrets.token_hex(32)
        # Every node's Ray temp dir (sessions, logs, sockets) lives here, on the host, so a failed node's
        # logs outlive it; short, as Ray's socket paths live under it.
        self.root = f"/tmp/vray-{secrets.token_hex(4)}"
        self.nodes: dict[str, Node] = {}
        self._used_ports: set[int] = set()
        self._next_worker_port = random.randrange(20000, 30000)  # above Ray's default 10002-19999
        self._next_ip = 2
        self.port = self.dashboard_port = 0
        self._watchdog: subprocess.Popen | None = None
        self.start_log: list[str] = []  # how each `ray start` went
        # Jobs and tasks run this environment's `python`, as a node built from cluster/ would.
        self.env = {
            **os.environ,
            **(s3_env or {}),
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> Cluster:
        os.makedirs(NODE_ROOT, exist_ok=True)  # the mount point; it stays empty outside the nodes
        os.makedirs(self.root)
        # A test run killed by a signal gets no teardown: then the watchdog stops the cluster.
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, str(os.getpid()), self.root], start_new_session=True
        )
        self._start(self._launch_head)
        for i in range(1, self.workers + 1):  # one at a time: each start is a burst of CPU work
            self._start(partial(self._launch_worker, f"w{i}", 2, 0, None))
        self.wait_for_nodes()
        return self

    def add_node(
        self, name: str, num_cpus: int = 2, num_gpus: int = 0, resources: dict | None = None
    ) -> Node:
        """Join a worker node on its own loopback address, e.g. a replacement for a killed one; it
        carries the resource ``voldit_<name>`` besides ``resources``."""
        if name in self.nodes:
            raise ValueError(f"node {name} is already in the cluster; kill_node it first")
        node = self._start(partial(self._launch_worker, name, num_cpus, num_gpus, resources))
        self.wait_for_nodes()
        return node

    def _start(self, launch) -> Node:
        """Start a node; one whose start fails (see AGENTS) is started again, afresh."""
        for attempt in range(1, START_ATTEMPTS + 1):
            began = time.time()
            node, process = launch()
            try:
                self._joined(node, process)
                self.start_log.append(f"{node.name} up in {time.time() - began:.0f} s")
                return node
            except RuntimeError as error:
                self._discard(node)
                why = [
                    line
                    for line in str(error).splitlines()
                    if re.search(r"Check failed|Error|Exception", line)
                ]
                self.start_log.append(f"{node.name} failed after {time.time() - began:.0f} s: {why[-1:]}")
                if attempt == START_ATTEMPTS:
                    raise
                logger.warning("attempt %d of %d failed: %s", attempt, START_ATTEMPTS, error)

    def _launch_head(self):
        self.port, self.dashboard_port = self._port(), self._port()
        args = ["--head", "--port", str(self.port), "--dashboard-port", str(self.dashboard_port)]
        args += ["--include-dashboard", "true", "--ray-client-server-port", str(self._port())]
        args += ["--system-config", json.dumps(SYSTEM_CONFIG)]
        return self._launch("head", HEAD_IP, 0, 0, {}, args)

    def _launch_worker(self, name, num_cpus, num_gpus, resources):
        ip = f"127.0.0.{self._next_ip}"  # a new address for every node, replacements too
        self._next_ip += 1
        resources = {f"voldit_{name}": 1, **(resources or {})}
        return self._launch(name, ip, num_cpus, num_gpus, resources, ["--address", self.address])

    def _launch(self, name, ip, num_cpus, num_gpus, resources, args):
        """Start ``ray start`` for a node in a new mount namespace; the node is in ``nodes`` as soon
        as its namespace is known, so stop() finds its processes even if ``ray start`` fails."""
        ports = {flag: self._port() for flag in NODE_PORT_FLAGS}
        ports["--min-worker-port"], ports["--max-worker-port"] = self._worker_ports()
        # On the host, so a failed node's logs outlive it, and a driver in the test process can attach
        # to the head's raylet (its sockets are here) as a driver on the head machine would.
        temp_dir = f"{self.root}/{ip}"
        command = [str(BIN / "ray"), "start", *args, "--node-ip-address", ip, "--temp-dir", temp_dir]
        command += ["--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)]
        command += ["--resources", json.dumps(resources), "--object-store-memory", str(OBJECT_STORE)]
        command += ["--disable-usage-stats", *(str(x) for pair in ports.items() for x in pair)]
        process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "sh", *command],
            env={**self.env, **NODE_ENV, **START_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        namespace = process.stdout.readline().strip()
        if not namespace.startswith("mnt:["):
            process.kill()
            raise RuntimeError(f"node {name}: no private mount namespace: {namespace}{process.stdout.read()}")
        self.nodes[name] = Node(name, ip, resources, namespace, temp_dir, ports)
        with open(f"{self.root}/namespaces", "a") as f:  # for the watchdog
            f.write(namespace + "\n")
        return self.nodes[name], process

    @staticmethod
    def _joined(node: Node, process: subprocess.Popen, timeout: float = 330) -> Node:
        """Wait for a node's ``ray start`` to finish; meanwhile its agents run at AGENT_NICENESS."""
        deadline = time.time() + timeout
        boosted = set()
        try:
            while True:
                try:
                    output, _ = process.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if time.time() > deadline:
                        process.kill()
                        output, _ = process.communicate()
                        break
                for pid in set(_agents(node.pids())) - boosted:
                    _set_niceness(pid, AGENT_NICENESS)
                    boosted.add(pid)
        finally:
            for _ in range(2):  # a boosted thread may have started another while we looked
                for pid in boosted:
                    _set_niceness(pid, os.getpriority(os.PRIO_PROCESS, 0))
        if process.returncode != 0:
            raise RuntimeError(f"node {node.name}: `ray start` failed:{node.log_tail()}\n{output[-3000:]}")
        return node

    def _discard(self, node: Node) -> None:
        _kill(node.pids)
        _kill(lambda: _naming(node.temp_dir))
        del self.nodes[node.name]
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def _worker_ports(self) -> tuple[int, int]:
        """The first and last of WORKER_PORTS free ports in a row, given to no other node."""
        while True:
            first = self._next_worker_port
            self._next_worker_port += WORKER_PORTS
            if all(_free(port) for port in range(first, first + WORKER_PORTS)):
                return first, first + WORKER_PORTS - 1

    def _port(self) -> int:
        """A free port, not yet given to any node of this cluster."""
        while True:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port

    def _api(self, path: str, attempts: int = 3):
        """GET a dashboard API; it may be slow to answer on a loaded machine."""
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=20) as response:
                    return json.load(response)
            except OSError:
                if attempt == attempts:
                    raise
                time.sleep(1)

    def node_states(self) -> list[dict]:
        """Every node the GCS knows, alive or dead: dicts with node_id, node_ip, state, resources_total."""
        return self._api("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]

    def wait_for_nodes(self, timeout: float = 120) -> None:
        """Wait until every node in ``nodes`` is alive in the GCS, and learn their node ids."""
        deadline = time.time() + timeout
        while True:
            try:
                alive = {n["node_ip"]: n for n in self.node_states() if n["state"] == "ALIVE"}
            except OSError:
                alive = {}
            for node in self.nodes.values():
                if node.ip in alive:
                    node.node_id = alive[node.ip]["node_id"]
            if all(node.node_id for node in self.nodes.values()):
                return
            if time.time() > deadline:
                missing = [n.name for n in self.nodes.values() if not n.node_id]
                raise TimeoutError(f"nodes {missing} did not join the cluster in {timeout} s")
            time.sleep(0.5)

    def kill_node(self, name: str, timeout: float = 60) -> Node:
        """SIGKILL every process of a worker node, as if its machine died; wait until the GCS says so."""
        node = self.nodes.pop(name)
        _kill(node.pids)
        deadline = time.time() + timeout
        while self._state(node) != "DEAD":
            if time.time() > deadline:
                raise TimeoutError(f"the GCS still lists node {name} alive {timeout} s after it was killed")
            time.sleep(0.5)
        return node

    def _state(self, node: Node) -> str | None:
        try:
            states = self.node_states()
        except OSError:  # the dashboard may be slow to answer on a loaded machine
            return None
        return next((n["state"] for n in states if n["node_id"] == node.node_id), None)

    def stop(self) -> None:
        """Kill every process this cluster started, worker nodes first, by PID."""
        for node in reversed(list(self.nodes.values())):
            _kill(node.pids)
        self.nodes.clear()
        _kill(lambda: _naming(self.root))
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watchdog:
            self._watchdog.kill()
            self._watchdog.wait()

    def submit(self, args: list[str], timeout: float = 600) -> tuple[int, str]:
        """``ray job submit`` of ``python <args>`` (e.g. ``["jobs/train.py", ...]``) from the repo root
        with jobs/runtime_env.yaml; returns its exit status and output (stdout then stderr)."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", "."]
        command += ["--runtime-env", "jobs/runtime_env.yaml", "--", "python", *map(str, args)]
        deadline = time.time() + timeout
        while True:  # the head's job agent may take a moment to come up after `ray start`
            result = subprocess.run(
                command,
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=max(deadline - time.time(), 1),
            )
            output = result.stdout + result.stderr
            if "No available agent" not in output or time.time() > deadline - 10:
                return result.returncode, output
            time.sleep(3)

    def python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``code`` as a Ray driver attached to the cluster, in the test process's namespace."""
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**self.env, "RAY_ADDRESS": self.address},
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _agents(pids) -> list[int]:
    """Which of these processes are a node's dashboard agent or runtime env agent."""
    found = []
    for pid in pids:
        try:
            if any(agent in arg for arg in psutil.Process(pid).cmdline() for agent in AGENTS):
                found.append(pid)
        except psutil.Error:
            pass
    return found


def _set_niceness(pid: int, niceness: int) -> None:
    """Set the niceness of every thread of a process (Linux keeps one per thread)."""
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:
            pass


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def _in_namespaces(namespaces: set[str]) -> list[int]:
    """Processes in any of these mount namespaces."""
    pids = []
    for pid in psutil.pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") in namespaces:
                pids.append(pid)
        except OSError:
            pass
    return pids


def _naming(folder: str) -> list[int]:
    """Processes whose command line names ``folder`` or a path in it (not /tmp/a/b2 for /tmp/a/b)."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            args = process.info["cmdline"] or []
            if process.pid != os.getpid() and any(a.endswith(folder) or f"{folder}/" in a for a in args):
                pids.append(process.pid)
        except psutil.Error:
            pass
    return pids


def _kill(find, timeout: float = 30) -> None:
    """SIGKILL the processes ``find()`` returns until it returns none (a raylet may fork a worker
    between one look and the next)."""
    deadline = time.time() + timeout
    while pids := find():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.time() > deadline:
            raise TimeoutError(f"processes {pids} survived SIGKILL for {timeout} s")
        time.sleep(0.1)


def _watch(parent: int, root: str) -> None:
    """Wait until process ``parent`` is gone, then kill the cluster it left running under ``root``."""
    process = psutil.Process(parent)
    while True:
        try:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(1)
    path = Path(root, "namespaces")
    namespaces = set(path.read_text().split()) if path.exists() else set()
    _kill(lambda: _in_namespaces(namespaces) + _naming(root))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # the watchdog: python tests/multinode.py <pid> <root>
    _watch(int(sys.argv[1]), sys.argv[2])
