"""`voldit sweep`: a Ray Tune sweep over VolDiT sizes and patch sizes (and any other config keys).

Each trial is a driver function that builds and fits one TorchTrainer (the Train V2 pattern), reporting
its per-epoch validation loss to Tune through ``TuneReportCallback``; ASHA stops weak trials early.
Trials are named by what they try (no timestamps), so re-running a sweep resumes each trial's run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from dataclasses import dataclass

import pandas as pd
from omegaconf import OmegaConf
from ray import tune

from voldit import storage as storage_lib
from voldit.config import ConfigError, load_config
from voldit.distributed.runtime import ensure_ray, require_gpus
from voldit.models.dit import DIT_MODELS

log = logging.getLogger(__name__)

DEFAULT_MODELS = [f"VolDiT-{size}/{p}" for size in ("XS", "S", "B", "L") for p in (2, 4)]
RESULTS_FILE = "results.csv"


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
        callbacks=[TuneReportCallback()],
    )


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
    grace_period: int = 1,
    address: str | None = None,
) -> SweepResult:
    """Run every model x grid point as a trial; returns the results table and the best checkpoint."""
    from voldit.cli import describe

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
    require_gpus(gpus_per_worker, workers)
    n_epochs = max(int(t["config"]["training"]["n_epochs"]) for t in trials)
    by_name = {t["name"]: t for t in trials}
    param_space = {
        "trial": tune.grid_search(trials),
        "train_data": storage_lib.resolve(train_data),
        "val_data": storage_lib.resolve(val_data),
        "storage": trial_storage,
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
    }
    # The trial's driver needs little; its TorchTrainer asks for the workers' CPUs and GPUs itself.
    trainable = tune.with_resources(_trial, {"CPU": 0.5})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=tune.schedulers.ASHAScheduler(
                metric="val_loss", mode="min", time_attr="epoch", max_t=n_epochs, grace_period=grace_period
            ),
            max_concurrent_trials=max_concurrent or None,
            # A fresh process per trial: nothing one trial's TorchTrainer leaves behind reaches the next.
            reuse_actors=False,
            trial_dirname_creator=lambda trial: trial.config["trial"]["name"],
        ),
        run_config=tune.RunConfig(name=name, **_tune_storage(storage_path)),
    )
    grid_result = tuner.fit()
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


def _tune_storage(storage_path: str) -> dict:
    """Tune keeps its experiment state beside the trials, local or in the object store."""
    if not storage_lib.is_remote(storage_path):
        return {"storage_path": storage_path}
    from voldit.distributed.data import arrow_filesystem

    fs, inner = storage_lib.filesystem(storage_path)
    return {"storage_path": inner, "storage_filesystem": arrow_filesystem(fs)}
