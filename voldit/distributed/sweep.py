"""`voldit sweep`: a Ray Tune sweep over VolDiT sizes and patch sizes (and any other config keys).

Each trial is a driver function that builds and fits one TorchTrainer (the Train V2 pattern), reporting
its per-epoch validation loss to Tune through ``TuneReportCallback``; ASHA stops weak trials early.
Re-running a sweep restores its Tune experiment: finished and stopped trials keep their results, the
others resume their runs. When Tune ends a trial, the sweep frees what the trial's TorchTrainer reserved.
"""

from __future__ import annotations

import logging
import os

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import remove_placement_group

from voldit import storage as storage_lib
from voldit.config import load_config
from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.training.sweeps import (
    TRIAL_CPU,
    SweepResult,
    check_trials,
    concurrent_trials,
    plan,
    summarise,
)

log = logging.getLogger(__name__)

LEDGER = "voldit-sweep-reservations"  # a named actor, one per sweep while it runs (see _Reservations)


def _trial(config: dict) -> None:
    """One trial: build this model's config and fit it with Ray Train, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from voldit.distributed.train import train

    trial = config["trial"]
    train(
        load_config(trial["config"]),
        "dit",
        config["train_data"],
        config["val_data"],
        name=trial["name"],
        storage=config["storage"],
        workers=config["workers"],
        gpus_per_worker=config["gpus_per_worker"],
        callbacks=[TuneReportCallback(), _RecordReservation(tune.get_context().get_trial_id())],
    )


# Why the sweep frees its trials' reservations itself: Tune ends a trial that ASHA stops by terminating
# the trial's actor while its TorchTrainer.fit() is still running, so no code after fit() in the trial
# runs. The Train controller, owned by that actor, dies with it before it shuts its worker group down,
# and the worker group's placement group outlives both: a placement group made by a non-detached actor
# belongs to the job (the sweep's driver) until removed. Ray Train's detached PlacementGroupCleaner removes
# it only once the state API reports the controller dead: late on a busy cluster, never without the
# dashboard; meanwhile the next trial's workers wait for the CPUs it holds. So the controller records
# each placement group it reserves (an internal Train callback, the hook Ray's own cleaner uses) in a
# ledger actor owned by the sweep's driver, and the driver, when Tune ends the trial, kills the trial's
# controller (so it cannot start another worker group) and removes the placement groups. A trial that
# finishes by itself has already removed its own; removing it again is skipped.


@ray.remote(num_cpus=0)
class _Reservations:
    """The sweep's ledger: per Tune trial id, each Train controller and the placement group it reserved."""

    def __init__(self) -> None:
        self._held: dict[str, list] = {}

    def add(self, trial_id: str, controller, group) -> None:
        self._held.setdefault(trial_id, []).append((controller, group))

    def pop(self, trial_id: str | None = None) -> list:
        """One trial's reservations, or (no id) every one left."""
        if trial_id is not None:
            return self._held.pop(trial_id, [])
        held = [entry for entries in self._held.values() for entry in entries]
        self._held.clear()
        return held


class _RecordReservation(WorkerGroupCallback):
    """Runs in a trial's Train controller: records each worker group's placement group in the ledger."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        ray.get(ray.get_actor(LEDGER).add.remote(self.trial_id, controller, group))


class _ReleaseReservations(tune.Callback):
    """Runs in the sweep's driver: frees what a trial reserved as soon as Tune ends or retries it.

    It holds no actor handle: Tune stores its callbacks with the experiment, for a later restore.
    """

    def _release(self, trial) -> None:
        _release(ray.get(ray.get_actor(LEDGER).pop.remote(trial.trial_id)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._release(trial)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._release(trial)


def _release(held: list) -> None:
    for controller, group in held:
        ray.kill(controller, no_restart=True)
        if ray.util.placement_group_table(group).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(group)


def sweep(
    base_config: dict,
    train_data: str,
    val_data: str,
    models: list[str] | None = None,
    grid: dict[str, list] | None = None,
    name: str = "sweep",
    storage: str = "outputs",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    max_concurrent: int = 0,
    max_failures: int = 1,
    grace_period: int = 1,
    address: str | None = None,
) -> SweepResult:
    """Run every model x grid point as a trial; returns the results table and the best checkpoint.

    Re-running with the same ``name`` and ``storage`` restores the sweep (with the settings it started
    with): finished and ASHA-stopped trials keep their results, unfinished and failed ones resume.
    """
    trials = plan(base_config, train_data, val_data, models, grid, storage, workers)
    storage_path = storage_lib.resolve(storage)
    trial_storage = storage_lib.join(storage_path, name, "trials")
    # Locally: the trial's driver, its workers and Ray Data's read tasks each need a CPU.
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, workers + 3))
    require_shared_storage({"--storage": storage})
    require_gpus(gpus_per_worker, workers)
    tune_storage = _tune_storage(storage_path)
    experiment = "/".join([tune_storage["storage_path"].rstrip("/"), name])
    filesystem = tune_storage.get("storage_filesystem")
    resume = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    check_trials(storage_lib.join(storage_path, name), trials, resume)
    # The trial's driver needs little; its TorchTrainer asks for the workers' CPUs and GPUs itself.
    trainable = tune.with_resources(_trial, {"CPU": TRIAL_CPU})
    if resume:
        log.info("resuming the sweep in %s, with the settings it started with", experiment)
        tuner = tune.Tuner.restore(
            experiment,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        at_once = concurrent_trials(ray.available_resources(), workers, gpus_per_worker, max_concurrent)
        if max_concurrent > at_once:
            log.warning("--max-concurrent %d: the cluster has room for %d trial(s)", max_concurrent, at_once)
        param_space = {
            "trial": tune.grid_search(trials),
            "train_data": storage_lib.resolve(train_data),
            "val_data": storage_lib.resolve(val_data),
            "storage": trial_storage,
            "workers": workers,
            "gpus_per_worker": gpus_per_worker,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=_tune_config(trials, at_once, grace_period),
            run_config=tune.RunConfig(
                name=name,
                **tune_storage,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                callbacks=[_ReleaseReservations()],
            ),
        )
    grid_result = _fit(tuner)
    frames = {r.config["trial"]["name"]: (r.metrics_dataframe, r.error) for r in grid_result}
    return summarise(trials, frames, storage_lib.join(storage_path, name), trial_storage)


def _tune_config(trials: list[dict], at_once: int, grace_period: int) -> tune.TuneConfig:
    return tune.TuneConfig(
        scheduler=tune.schedulers.ASHAScheduler(
            metric="val_loss",
            mode="min",
            time_attr="epoch",
            max_t=max(int(t["config"]["training"]["n_epochs"]) for t in trials),
            grace_period=grace_period,
            stop_last_trials=False,  # a trial that reaches max_t ends by itself: its TorchTrainer finishes
        ),
        max_concurrent_trials=at_once,
        # A fresh process per trial: nothing one trial's TorchTrainer leaves behind reaches the next.
        reuse_actors=False,
        trial_dirname_creator=_trial_dirname,
    )


def _trial_dirname(trial) -> str:
    return trial.config["trial"]["name"]


def _fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """Fit with the ledger of reservations up; whatever is left in it at the end is freed."""
    ledger = _Reservations.options(name=LEDGER).remote()
    ray.get(ledger.__ray_ready__.remote())
    try:
        return tuner.fit()
    finally:
        _release(ray.get(ledger.pop.remote()))  # trials Tune did not end itself, e.g. on an interrupt
        ray.kill(ledger)


def _tune_storage(storage_path: str) -> dict:
    """Tune keeps its experiment state beside the trials, local or in the object store."""
    if not storage_lib.is_remote(storage_path):
        return {"storage_path": storage_path}
    from voldit.storage import arrow_filesystem

    fs, inner = storage_lib.filesystem(storage_path)
    return {"storage_path": inner, "storage_filesystem": arrow_filesystem(fs)}
