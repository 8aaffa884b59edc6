"""Starting or joining Ray: a cluster when RAY_ADDRESS (or --address) names one, else an embedded local Ray."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray once per process.

    ``address`` (or $RAY_ADDRESS, set inside `ray job submit`) joins that cluster; "auto" joins the one
    started on this machine; otherwise a fresh local Ray is started (never a stale one from /tmp/ray).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": num_cpus} if address == "local" and num_cpus else {}
    ray.init(address=address, log_to_driver=True, **kwargs)
    logging.getLogger("ray.data").setLevel(
        logging.WARNING
    )  # per-stage INFO lines would drown the progress line
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows its own progress line
    log.info("ray: %s", "local" if address == "local" else address)


class GPUUnavailable(RuntimeError):
    """GPUs were asked for that the Ray cluster does not have."""


def require_gpus(per_worker: float, workers: int) -> None:
    """Fail at once, rather than wait forever, when GPUs are asked for that the cluster does not have."""
    if per_worker <= 0:
        return
    available = ray.cluster_resources().get("GPU", 0)
    if available < per_worker * max(workers, 1):
        raise GPUUnavailable(
            f"asked for {per_worker} GPU(s) per worker x {max(workers, 1)} worker(s), but the Ray cluster has "
            f"{available:g} GPU(s); use --gpus-per-worker 0 to run on CPUs"
        )
