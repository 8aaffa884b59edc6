"""`voldit sweep`: a Ray Tune sweep over VolDiT sizes and patch sizes (and any other config keys).

Each trial is a driver function that builds and fits one TorchTrainer (the Train V2 pattern), reporting
its per-epoch validation loss to Tune through ``TuneReportCallback``; ASHA stops weak trials early.
Re-running a sweep restores its Tune experiment: finished and stopped trials keep their results, the
others resume their runs. When Tune ends a trial, the sweep frees what the trial's TorchTrainer reserved.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass

import pandas as pd
import ray
from omegaconf import OmegaConf
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import remove_placement_group

from voldit import storage as storage_lib
from voldit.builders import describe
from voldit.config import ConfigError, load_config
from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.models.dit import DIT_MODELS

log = logging.getLogger(__name__)

DEFAULT_MODELS = [f"VolDiT-{size}/{p}" for size in ("XS", "S", "B", "L") for p in (2, 4)]
RESULTS_FILE = "results.csv"
TRIALS_FILE = "trials.json"  # the trials a sweep was started with; a re-run must ask for the same
TRIAL_CPU = 0.5  # a trial's driver only builds its TorchTrainer and waits on it
WORKER_CPU = 1  # each train worker's CPU (voldit.distributed.train asks for one per worker)
DATA_CPU = 1  # kept free for the Ray Data read tasks that feed every trial's workers
LEDGER = "voldit-sweep-reservations"  # a named actor, one per sweep while it runs (see _Reservations)


def model_name(text: str) -> str:
    """'xs4', 'XS/4' or 'VolDiT-XS/4' -> 'VolDiT-XS/4'."""
    match = re.fullmatch(r"(?:voldit-)?(xs|s|b|l)/?([24])", text.strip().lower())
    if not match:
        raise ConfigError(
            f"unknown model {text!r}; use e.g. VolDiT-XS/4, S/2 or b4 ({', '.join(DIT_MODELS)})"
        )
    return f"VolDiT-{match.group(1).upper()}/{match.group(2)}"


def parse_grid(items: list[str]) -> dict[str, list]:
    """['optim.lr=1e-4,3e-4'] -> {'optim.lr': [1e-4, 3e-4]} (values parsed as YAML scalars)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise ConfigError(f"--grid {item!r}: expected section.key=value1,value2,...")
        grid[key.strip()] = [_scalar(v.strip()) for v in values.split(",")]
    return grid


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def _trial_name(model: str, overrides: dict) -> str:
    parts = [model.removeprefix("VolDiT-").replace("/", "").lower()]
    parts += [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "_".join(parts))


@dataclass
class SweepResult:
    table: pd.DataFrame
    best_trial: str | None
    best_checkpoint: str | None
    results_file: str


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


def concurrent_trials(free: dict, workers: int, gpus_per_worker: float = 0.0, asked: int = 0) -> int:
    """How many trials fit at once in ``free`` resources (``ray.available_resources()``).

    Each trial needs its driver's CPU share and its workers' CPUs (and GPUs), and one CPU stays free for
    Ray Data; Tune itself counts only the drivers' share, and trial drivers holding every CPU while their
    workers wait would never finish. ``asked`` (> 0) can only lower the result; it is at least 1.
    """
    fits = int((free.get("CPU", 0.0) - DATA_CPU) // (TRIAL_CPU + workers * WORKER_CPU))
    if gpus_per_worker > 0:
        fits = min(fits, int(free.get("GPU", 0.0) // (gpus_per_worker * workers)))
    fits = max(fits, 1)
    return min(fits, asked) if asked > 0 else fits


def trial_configs(base: dict, models: list[str], grid: dict[str, list]) -> list[dict]:
    """Every (model, grid point) as a resolved config dict with its trial name."""
    trials = []
    keys = list(grid)
    for model in models:
        preset = DIT_MODELS[model]
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            overrides = dict(zip(keys, values, strict=True))
            dotted = [f"dit.params.{k}={v}" for k, v in preset.items()]
            dotted += [f"{k}={v}" for k, v in overrides.items()]
            dotted.append("training.eval_freq=1")  # ASHA compares validation loss every epoch
            cfg = load_config(base, overrides=dotted)
            trials.append(
                {
                    "name": _trial_name(model, overrides),
                    "model": model,
                    "overrides": overrides,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                }
            )
    return trials


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
    models = [model_name(m) for m in (models or DEFAULT_MODELS)]
    trials = trial_configs(base_config, models, grid or {})
    for url, what in ((storage, "storage"), (train_data, "training data"), (val_data, "validation data")):
        storage_lib.check(url, what)
    if not val_data:
        raise ConfigError("a sweep ranks trials by validation loss: give --val")
    storage_path = storage_lib.resolve(storage)
    trial_storage = storage_lib.join(storage_path, name, "trials")
    if workers < 1:
        raise ConfigError("a sweep runs each trial's TorchTrainer with at least one worker (--workers 1)")
    # Locally: the trial's driver, its workers and Ray Data's read tasks each need a CPU.
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, workers + 3))
    require_shared_storage({"--storage": storage})
    require_gpus(gpus_per_worker, workers)
    by_name = {t["name"]: t for t in trials}
    tune_storage = _tune_storage(storage_path)
    experiment = "/".join([tune_storage["storage_path"].rstrip("/"), name])
    filesystem = tune_storage.get("storage_filesystem")
    resume = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    _check_trials(storage_lib.join(storage_path, name), trials, resume)
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
    rows = []
    for result in grid_result:
        trial_name = result.config["trial"]["name"]
        trial = by_name[trial_name]
        frame = result.metrics_dataframe
        history = (
            frame["val_loss"].dropna()
            if frame is not None and "val_loss" in frame
            else pd.Series([], dtype=float)
        )
        speed = (
            frame["samples_per_s"].dropna()
            if frame is not None and "samples_per_s" in frame
            else pd.Series([], dtype=float)
        )
        info = describe(load_config(trial["config"]))
        rows.append(
            {
                "trial": trial_name,
                "model": trial["model"],
                **{k: v for k, v in trial["overrides"].items()},
                "parameters": info["trainable_parameters"],
                "tokens": info["tokens"],
                "epochs": int(frame["epoch"].max()) if frame is not None and "epoch" in frame else 0,
                "best_val_loss": float(history.min()) if len(history) else math.nan,
                "samples_per_s": float(speed.median()) if len(speed) else math.nan,
                "tokens_per_s": float(speed.median() * info["tokens"]) if len(speed) else math.nan,
                "error": str(result.error) if result.error else "",
                "checkpoint": storage_lib.join(trial_storage, trial_name, "checkpoints", "best"),
            }
        )
    table = pd.DataFrame(rows).sort_values("best_val_loss", na_position="last").reset_index(drop=True)
    results_file = storage_lib.join(storage_path, name, RESULTS_FILE)
    storage_lib.write_text(results_file, table.to_csv(index=False))
    ok = table[table["error"] == ""].dropna(subset=["best_val_loss"])
    best = ok.iloc[0] if len(ok) else None
    return SweepResult(
        table=table,
        best_trial=None if best is None else best["trial"],
        best_checkpoint=None if best is None else best["checkpoint"],
        results_file=results_file,
    )


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


def _check_trials(folder: str, trials: list[dict], resume: bool) -> None:
    """A restored sweep runs the trials it started with: refuse a re-run that asks for others."""
    path, text = storage_lib.join(folder, TRIALS_FILE), json.dumps(trials, sort_keys=True)
    if not resume or not storage_lib.exists(path):
        storage_lib.write_text(path, text)
        return
    before = json.loads(storage_lib.read_text(path))
    if before != json.loads(text):
        raise ConfigError(
            f"the sweep in {folder} was started with other trials or settings "
            f"({', '.join(sorted(t['name'] for t in before))}); re-run it with the same models, grid and "
            "config to resume it, or give another --name"
        )


def _tune_storage(storage_path: str) -> dict:
    """Tune keeps its experiment state beside the trials, local or in the object store."""
    if not storage_lib.is_remote(storage_path):
        return {"storage_path": storage_path}
    from voldit.distributed.data import arrow_filesystem

    fs, inner = storage_lib.filesystem(storage_path)
    return {"storage_path": inner, "storage_filesystem": arrow_filesystem(fs)}
