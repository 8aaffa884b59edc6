"""Starting or joining Ray, and what a job needs of the cluster before it starts: GPUs (waiting for the
autoscaler to add them) and storage that every node can reach."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import ray

from voldit import storage
from voldit.errors import VolditError

log = logging.getLogger(__name__)

WAIT_ENV = "VOLDIT_WAIT_FOR_RESOURCES"  # seconds a job waits for the autoscaler (--wait-for-resources)
SHARED_DIR_ENV = "VOLDIT_SHARED_DIR"  # a folder every node mounts (EFS, NFS): --shared-dir
# Long enough for a cloud GPU node to boot, pull the image and join (5-15 minutes on AWS), with margin.
DEFAULT_WAIT = 1800.0
_AUTOSCALER_STATUS = b"__autoscaling_status"  # written by Ray's autoscaler (monitor) on the head


class GPUUnavailable(VolditError, RuntimeError):
    """GPUs were asked for that the Ray cluster does not have and will not get."""


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    ``address`` (or $RAY_ADDRESS, set inside `ray job submit`) joins that cluster; "auto" joins the one
    started on this machine; otherwise a fresh local Ray is started (never a stale one from /tmp/ray).
    Unless voldit logs at DEBUG (-v), Ray's own INFO lines stay off the console (see ``quiet_ray_logs``).
    """
    global _local
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    _local = address == "local"
    kwargs = {"num_cpus": num_cpus} if address == "local" and num_cpus else {}
    loud = verbose()
    if not loud:
        quiet_ray_logs()  # the driver's own Ray Data and Ray Train lines
        kwargs["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.quiet_ray_logs"}
    ray.init(
        address=address, log_to_driver=True, logging_level=logging.INFO if loud else logging.WARNING, **kwargs
    )
    logging.getLogger("ray.data").setLevel(logging.INFO if loud else logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows its own progress line
    context.print_on_execution_start = loud  # each dataset's plan, from every process that runs one
    log.info("ray: %s", "local" if address == "local" else address)


def verbose() -> bool:
    """-v (voldit logging at DEBUG): show Ray's own INFO lines too."""
    return logging.getLogger("voldit").isEnabledFor(logging.DEBUG)


RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


class OwnProgressOnly(logging.Filter):
    """Drops Ray Data's warning that its progress bars are off: voldit turns them off for its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def quiet_ray_logs() -> None:
    """Keep Ray's own INFO lines off the console; run in the driver and, as Ray's worker_process_setup_hook,
    in every worker process. Ray Data still writes them to the session's ray-data.log (its logging config,
    which it reloads for every dataset, is ours with the console at WARNING); Ray Train's notices of each
    report and checkpoint, logged under their file's path, are dropped. Warnings always show."""
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_LOGGING)
    for handler in logging.getLogger("ray.data").handlers:  # configured before the variable was set
        handler.addFilter(OwnProgressOnly())
    # Ray Train's own default ingest options still set a field Ray Data deprecates: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
    train = Path(ray.__file__).parent / "train" / "v2" / "_internal" / "execution"
    for module in ("context.py", "storage.py"):
        logging.getLogger(str(train / module)).setLevel(logging.WARNING)


def wait_seconds() -> float:
    """How long a job waits for the resources it asked for ($VOLDIT_WAIT_FOR_RESOURCES, --wait-for-resources)."""
    raw = os.environ.get(WAIT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_WAIT
    except ValueError:
        raise GPUUnavailable(f"{WAIT_ENV}={raw!r} is not a number of seconds") from None


_READONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")  # how Ray names the nodes of a cluster it cannot grow
_FIRST_REPORT = 15.0  # seconds a cluster's autoscaler may take to write its first report (one iteration)
_local = False  # this process started its own local Ray: no autoscaler
# The autoscaler found on this cluster, "v1" (KV report) or "v2" (GCS state): later polls ask it alone
# (on KubeRay, no 15 s wait for a v1 report each time).
_version: str | None = None


def autoscaler_status() -> dict | None:
    """The autoscaler's latest report, or None when the cluster cannot grow: a local Ray or nodes
    started by hand run a read-only autoscaler, whose node types are the nodes' own ids.

    Returns {"time": iteration stamp, "launching": {node type: count}, "booting": count}.
    """
    from ray.experimental.internal_kv import _internal_kv_get

    global _version
    if _local:
        return None
    if _version != "v2":
        deadline = time.monotonic() + _FIRST_REPORT
        while True:
            raw = _internal_kv_get(_AUTOSCALER_STATUS)
            status = json.loads(raw) if raw else {}
            report = status.get("autoscaler_report") or {}
            types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
            # A cluster started a moment ago: its autoscaler (v1) has not reported, or has reported before
            # it saw any node (no node types yet), which tells nothing.
            if types or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if types:
            _version = "v1"
            if all(_READONLY_TYPE.fullmatch(t) for t in types):
                return None
            return {
                "time": status.get("time"),
                "launching": report.get("pending_launches") or {},
                "booting": len(report.get("pending_nodes") or []),
            }
    try:  # autoscaler v2 (KubeRay) reports to the GCS instead
        from ray.autoscaler.v2.sdk import get_cluster_status

        cluster = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - no v2 autoscaler state: the cluster cannot grow
        return None
    if str(cluster.stats.autoscaler_version or "0") == "0":
        return None
    _version = "v2"
    launching: dict[str, int] = {}
    for launch in cluster.pending_launches:
        launching[launch.ray_node_type_name] = launching.get(launch.ray_node_type_name, 0) + launch.count
    return {
        "time": cluster.stats.autoscaler_version,
        "launching": launching,
        "booting": len(cluster.pending_nodes),
    }


def _gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def require_gpus(
    per_worker: float,
    workers: int,
    wait: float | None = None,
    poll: float = 5.0,
    say: Callable[[str], None] = log.warning,
) -> None:
    """Return once the cluster has ``per_worker x workers`` GPUs.

    A cluster with an autoscaler is asked for them (``request_resources``) and waited for, with a line
    every 30 s saying what the job waits for, up to ``wait`` seconds (default $VOLDIT_WAIT_FOR_RESOURCES,
    else 30 minutes). It fails at once when no autoscaler can add nodes, and early when the autoscaler,
    asked for them, launches nothing for six iterations (no node type has GPUs, or its max_workers is reached).
    """
    if per_worker <= 0:
        return
    workers = max(workers, 1)
    need = per_worker * workers
    if _gpus() >= need:
        return
    asked = f"{per_worker:g} GPU(s) per worker x {workers} worker(s)"
    status = autoscaler_status()
    if status is None:
        raise GPUUnavailable(
            f"asked for {asked}, but the Ray cluster has {_gpus():g} GPU(s) and no autoscaler to add "
            "more; use --gpus-per-worker 0 to run on CPUs, or a cluster that can start GPU nodes"
        )
    from ray.autoscaler.sdk import request_resources

    wait = wait_seconds() if wait is None else wait
    request_resources(bundles=[{"GPU": per_worker}] * workers)
    start = last_said = time.monotonic()
    said_first = False
    idle_reports, seen = 0, status.get("time")
    try:
        while _gpus() < need:
            waited = time.monotonic() - start
            if waited >= wait:
                raise GPUUnavailable(
                    f"waited {waited:.0f} s for {asked} and the cluster has {_gpus():g}; the autoscaler did "
                    f"not add them in time. Check `ray status` on the head, or wait longer with "
                    f"--wait-for-resources SECONDS (now {wait:.0f})"
                )
            status = autoscaler_status() or {}
            launching, booting = status.get("launching") or {}, status.get("booting", 0)
            if status.get("time") != seen:  # a new autoscaler iteration since the last look
                seen = status.get("time")
                idle_reports = 0 if launching or booting else idle_reports + 1
            if idle_reports >= 6:  # about 30 s of autoscaler iterations that launch nothing
                raise GPUUnavailable(
                    f"asked for {asked}; the cluster has {_gpus():g} GPU(s) and its autoscaler starts no "
                    "node for them: no node type provides GPUs, or the GPU node type's max_workers is "
                    "reached. Check the cluster config, or use --gpus-per-worker 0 to run on CPUs"
                )
            if not said_first or time.monotonic() - last_said >= 30:
                nodes = ", ".join(f"{k} x{v}" for k, v in launching.items()) or "none yet"
                say(
                    f"waiting for {asked}: the cluster has {_gpus():g}; the autoscaler is starting nodes "
                    f"({nodes}, {booting} booting); {waited:.0f} s of {wait:.0f} s "
                    "(--wait-for-resources)"
                )
                said_first, last_said = True, time.monotonic()
            time.sleep(poll)
    finally:
        request_resources(bundles=[])  # the job's own tasks keep the nodes; the request is not needed
    log.info("the cluster has the %g GPU(s) asked for, after %.0f s", need, time.monotonic() - start)


def shared_dir() -> str | None:
    """The folder every node mounts ($VOLDIT_SHARED_DIR, --shared-dir), if one was declared."""
    return os.environ.get(SHARED_DIR_ENV) or None


def _multi_node() -> int:
    """How many nodes the cluster has or may get: alive nodes, or 2 when an autoscaler can add some."""
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    return max(alive, 2) if alive == 1 and autoscaler_status() is not None else alive


def require_shared_storage(paths: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, output folders that the cluster's nodes cannot all see.

    On a cluster of more than one node (or one that an autoscaler can grow), every local path must lie
    under the declared shared folder; otherwise each node would write into its own disk and the driver
    would find nothing.
    """
    local = {what: path for what, path in paths.items() if path and not storage.is_remote(path)}
    if not local:
        return
    nodes = _multi_node()
    if nodes <= 1:
        return
    shared = shared_dir()
    for what, path in local.items():
        resolved = Path(path).resolve()
        if shared and resolved.is_relative_to(Path(shared).resolve()):
            continue
        raise storage.StorageError(
            f"{what} {path} is a local folder, but the Ray cluster has {nodes} nodes that do not share it; "
            "use an s3:// URL, or a folder every node mounts declared with --shared-dir "
            f"(${SHARED_DIR_ENV}), e.g. --shared-dir /shared for EFS/NFS"
            + (f" (declared: {shared})" if shared else "")
        )
