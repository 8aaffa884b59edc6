"""Planning and summarising a `voldit sweep`, without Ray: which models and grid points become trials,
how many fit at once, and the results table from each trial's reported metrics.
voldit.distributed.sweep runs the trials with Ray Tune."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass

import pandas as pd
from omegaconf import OmegaConf

from voldit import storage
from voldit.builders import describe
from voldit.config import ConfigError, load_config
from voldit.models.dit import DIT_MODELS

DEFAULT_MODELS = [f"VolDiT-{size}/{p}" for size in ("XS", "S", "B", "L") for p in (2, 4)]
RESULTS_FILE = "results.csv"
TRIALS_FILE = "trials.json"  # the trials a sweep was started with; a re-run must ask for the same
TRIAL_CPU = 0.5  # a trial's driver only builds its TorchTrainer and waits on it
WORKER_CPU = 1  # each train worker's CPU (voldit.distributed.train asks for one per worker)
DATA_CPU = 1  # kept free for the Ray Data read tasks that feed every trial's workers


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


def plan(
    base_config: dict,
    train_data: str,
    val_data: str,
    models: list[str] | None,
    grid: dict[str, list] | None,
    storage_url: str,
    workers: int,
) -> list[dict]:
    """Check a sweep's inputs and list its trials: every model (default: all eight) x grid point."""
    models = [model_name(m) for m in (models or DEFAULT_MODELS)]
    trials = trial_configs(base_config, models, grid or {})
    for url, what in ((storage_url, "storage"), (train_data, "training data"), (val_data, "validation data")):
        storage.check(url, what)
    if not val_data:
        raise ConfigError("a sweep ranks trials by validation loss: give --val")
    if workers < 1:
        raise ConfigError("a sweep runs each trial's TorchTrainer with at least one worker (--workers 1)")
    return trials


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


def check_trials(folder: str, trials: list[dict], resume: bool) -> None:
    """A restored sweep runs the trials it started with: refuse a re-run that asks for others."""
    path, text = storage.join(folder, TRIALS_FILE), json.dumps(trials, sort_keys=True)
    if not resume or not storage.exists(path):
        storage.write_text(path, text)
        return
    before = json.loads(storage.read_text(path))
    if before != json.loads(text):
        raise ConfigError(
            f"the sweep in {folder} was started with other trials or settings "
            f"({', '.join(sorted(t['name'] for t in before))}); re-run it with the same models, grid and "
            "config to resume it, or give another --name"
        )


def summarise(
    trials: list[dict], frames: dict[str, tuple[pd.DataFrame | None, object]], folder: str, trial_storage: str
) -> SweepResult:
    """The results table, best validation loss first, written to ``folder``/RESULTS_FILE, from each trial's
    (per-epoch metrics frame or None, error or None) by trial name."""
    rows = []
    for trial in trials:
        if trial["name"] not in frames:
            continue
        frame, error = frames[trial["name"]]
        info = describe(load_config(trial["config"]))
        history, speed = _column(frame, "val_loss"), _column(frame, "samples_per_s")
        rows.append(
            {
                "trial": trial["name"],
                "model": trial["model"],
                **trial["overrides"],
                "parameters": info["trainable_parameters"],
                "tokens": info["tokens"],
                "epochs": int(frame["epoch"].max()) if frame is not None and "epoch" in frame else 0,
                "best_val_loss": float(history.min()) if len(history) else math.nan,
                "samples_per_s": float(speed.median()) if len(speed) else math.nan,
                "tokens_per_s": float(speed.median() * info["tokens"]) if len(speed) else math.nan,
                "error": str(error) if error else "",
                "checkpoint": storage.join(trial_storage, trial["name"], "checkpoints", "best"),
            }
        )
    table = pd.DataFrame(rows).sort_values("best_val_loss", na_position="last").reset_index(drop=True)
    results_file = storage.join(folder, RESULTS_FILE)
    storage.write_text(results_file, table.to_csv(index=False))
    ok = table[table["error"] == ""].dropna(subset=["best_val_loss"])
    best = ok.iloc[0] if len(ok) else None
    return SweepResult(
        table=table,
        best_trial=None if best is None else best["trial"],
        best_checkpoint=None if best is None else best["checkpoint"],
        results_file=results_file,
    )


def _column(frame: pd.DataFrame | None, name: str) -> pd.Series:
    return frame[name].dropna() if frame is not None and name in frame else pd.Series([], dtype=float)
