"""Planning a training run, without Ray: the checks, the config each stage really trains, its data and
where it writes; and the stage a worker builds from that plan. voldit.distributed.train runs the plan.

Everything here is plain Python, so a wrong flag, a latent set of another shape or a VolDiT of another
grid is refused before a cluster is asked for anything, and tests drive `fit` from a plan without Ray.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from voldit import storage
from voldit.builders import model_from_checkpoint
from voldit.checkpoint import Checkpoint, load_checkpoint
from voldit.config import ConfigError, load_config, section_dict, stage_of
from voldit.data.latents import LatentDatasetError, load_info
from voldit.data.manifest import read_manifest
from voldit.data.preprocess import Grid
from voldit.training.context import RunContext, TrainingError
from voldit.training.stages import DiffusionStage, VQGANStage

log = logging.getLogger(__name__)

STAGES = ("vqgan", "dit", "tgca")
FAILURE_ENV = "VOLDIT_INJECT_FAILURE"  # "STEP:MARKER": rank 0 crashes once at STEP while MARKER exists


@dataclass
class TrainJob:
    """Everything a worker needs, picklable: the resolved config and the paths of its inputs."""

    config: dict
    stage: str
    run_dir: str
    scale_factor: float | None = None
    base_checkpoint: str | None = None
    vqgan_checkpoint: str | None = None
    inject_failure: str | None = None
    has_validation: bool = False
    provenance: dict | None = None  # stored in every checkpoint's meta: the VQ-GAN, the label values seen
    remote_run_dir: str | None = None  # with s3:// storage: where run_dir's checkpoints and logs go


@dataclass
class TrainPlan:
    """A run ready to start: the job for the workers and what each split is read from, either image
    manifests (``volumes``, preprocessed on the fly) or latent folders (``latents``, these columns)."""

    job: TrainJob
    cfg: DictConfig
    storage_path: str  # the run's parent folder or URL, resolved
    volumes: dict[str, pd.DataFrame] = field(default_factory=dict)
    latents: dict[str, str] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)

    @property
    def grid(self) -> Grid:
        return Grid.of(self.cfg)

    @property
    def augment(self) -> bool:
        return bool(self.cfg.training.augment)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    checkpoint: Path | str | None  # the run's latest checkpoint
    remote_run_dir: str | None = None

    def _named(self, name: str) -> Path | str:
        if self.remote_run_dir:
            return storage.join(self.remote_run_dir, "checkpoints", name)
        return self.run_dir / "checkpoints" / name

    @property
    def best(self) -> Path | str:
        return self._named("best")

    @property
    def latest(self) -> Path | str:
        return self._named("latest")


def plan(
    cfg: DictConfig,
    stage: str,
    train_data: str,
    val_data: str | None = None,
    dit: str | None = None,
    vqgan: str | None = None,
    name: str = "voldit",
    storage_url: str = "outputs",
) -> TrainPlan:
    """Check the inputs and work out the run: the config (a TGCA's VolDiT architecture and every diffusion
    stage's grid come from their checkpoints and data), the scale factor, the provenance the checkpoints
    keep, and the run folder (a local staging folder when ``storage_url`` is remote)."""
    if stage not in STAGES:
        raise ConfigError(f"--stage must be vqgan, dit or tgca, got {stage!r}")
    checks = {"storage": storage_url, "training data": train_data, "validation data": val_data}
    for what, url in {**checks, "--dit": dit, "--vqgan": vqgan}.items():
        if url:
            storage.check(url, what)  # one clear error before any work: endpoint, credentials, bucket
    base = None
    if stage == "tgca":
        if not dit:
            raise ConfigError("--stage tgca needs --dit, the VolDiT checkpoint to adapt")
        if cfg.tgca is None:
            raise ConfigError(
                "--stage tgca needs a config with a tgca section (e.g. configs/tgca/tgca_ds8.yaml)"
            )
        base = load_checkpoint(dit, stage="dit")
        cfg = _tgca_config(cfg, base)
    if stage_of(cfg) != stage:
        raise ConfigError(f"the config describes the {stage_of(cfg)} stage, but --stage is {stage}")
    online = stage != "vqgan" and bool(vqgan) and str(train_data).endswith(".csv")
    _check_latent_source(cfg, stage, train_data, online)
    if stage != "vqgan":
        cfg = _with_data_grid(cfg, train_data, vqgan if online else None, base)
    storage_path = storage.resolve(storage_url)
    job = TrainJob(
        config={},
        stage=stage,
        run_dir=str(Path(storage_path) / name),
        inject_failure=os.environ.get(FAILURE_ENV),
    )
    if storage.is_remote(storage_path):
        # Checkpoints and logs are written to a local staging folder and uploaded as they complete.
        job.remote_run_dir = storage.join(storage_path, name)
        job.run_dir = str(storage.staging_dir("runs", job.remote_run_dir) / name)
    out = TrainPlan(job=job, cfg=cfg, storage_path=storage_path)
    splits = {"train": train_data, **({"val": val_data} if val_data else {})}
    if stage == "vqgan" or online:
        out.volumes = {split: read_manifest(path, ["image"]) for split, path in splits.items()}
        out.columns = ["image"]
        if online:
            job.vqgan_checkpoint = storage.resolve(vqgan)
            job.scale_factor = _estimate_scale_factor(out.volumes["train"], vqgan, out.grid)
            log.info("scale factor estimated from the first training volumes: %.4f", job.scale_factor)
    else:
        out.latents = {split: str(path) for split, path in splits.items()}
        out.columns = ["latent", *(cfg.tgca.condition_keys if stage == "tgca" else [])]
        job.scale_factor = _check_latents(cfg, train_data, stage)
        if val_data:
            _check_latents(cfg, val_data, stage)
    # The scale factor: the config's if given; for TGCA the frozen VolDiT's (it was trained with it);
    # else the latent dataset's, or the online estimate.
    if cfg.training.scale_factor is not None:
        job.scale_factor = float(cfg.training.scale_factor)
    elif base is not None and base.meta.get("scale_factor"):
        job.scale_factor = base.meta["scale_factor"]
    if base is not None:
        job.base_checkpoint = storage.resolve(dit)
    if stage != "vqgan":
        job.provenance = _provenance(stage, train_data, job, base)
    job.config = OmegaConf.to_container(cfg, resolve=True)
    job.has_validation = bool(val_data)
    return out


def finish(job: TrainJob, metrics: dict) -> TrainResult:
    """The run's result from its last reported metrics; a diverged run is a TrainingError."""
    if metrics.get("diverged"):
        raise TrainingError(
            f"the loss became {metrics['loss']} at step {metrics['step'] + 1} (epoch {metrics['epoch'] + 1}); "
            f"training stopped. The last good checkpoint is "
            f"{storage.join(job.remote_run_dir or job.run_dir, 'checkpoints', 'latest')}"
        )
    done = TrainResult(
        run_dir=Path(job.run_dir), metrics=metrics, checkpoint=None, remote_run_dir=job.remote_run_dir
    )
    done.checkpoint = done.latest
    return done


def build_stage(job: TrainJob, cfg: DictConfig, ctx: RunContext):
    """The stage a worker trains, from the plan's job; rank 0 of a run asked to fail gets the fault."""
    if job.stage == "vqgan":
        stage = VQGANStage(cfg, ctx)
    else:
        base_state = None
        if job.stage == "tgca":
            base_state = load_checkpoint(job.base_checkpoint, stage="dit").model_state(use_ema=True)
        encoder = None
        if job.vqgan_checkpoint:
            encoder = model_from_checkpoint(load_checkpoint(job.vqgan_checkpoint, stage="vqgan"))
        stage = DiffusionStage(
            cfg, ctx, job.scale_factor, base_state=base_state, encoder=encoder, provenance=job.provenance
        )
    if job.inject_failure and ctx.rank == 0:
        stage = _FailOnce(stage, job.inject_failure)
    return stage


class _FailOnce:
    """Crash the worker process once at a given step: a real worker loss for fault-tolerance tests."""

    def __init__(self, stage, spec: str) -> None:
        at, self.marker = spec.split(":", 1)
        self._inner, self.at, self.count = stage, int(at), 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def train_step(self, batch, epoch):
        self.count += 1
        if self.count == self.at and os.path.exists(self.marker):
            os.remove(self.marker)
            os._exit(1)
        return self._inner.train_step(batch, epoch)


def _tgca_config(cfg: DictConfig, base: Checkpoint) -> DictConfig:
    """The TGCA run's config: the frozen VolDiT's architecture comes from its checkpoint."""
    ours = OmegaConf.to_container(cfg, resolve=True)
    theirs = section_dict(base.config.dit)
    if cfg.dit is not None:
        mine = section_dict(cfg.dit)
        for section in ("params", "scheduler"):
            arch = {
                k: v
                for k, v in mine[section].items()
                if k not in ("dropout", "attention_dropout", "attention")
            }
            diff = {k: (v, theirs[section].get(k)) for k, v in arch.items() if theirs[section].get(k) != v}
            if diff:
                raise TrainingError(
                    f"the VolDiT checkpoint {base.path} has another architecture than the config's dit "
                    f"section: {', '.join(f'{k}: config {a} vs checkpoint {b}' for k, (a, b) in diff.items())}. "
                    "Leave the dit section out (it is read from the checkpoint) or point --dit at the right run"
                )
    ours["dit"] = theirs
    return load_config(ours)


def _with_data_grid(
    cfg: DictConfig, train_data: str, vqgan: str | None, base: Checkpoint | None
) -> DictConfig:
    """The config with the grid (spacing, orientation) its latents were made on: recorded in the latent
    dataset, or the ``vqgan``'s when encoding online. The checkpoint keeps it, so sampling reads it there."""
    if vqgan:
        grid = Grid.of(load_checkpoint(vqgan, stage="vqgan").config).recorded()
    else:
        try:
            info = load_info(train_data)
        except LatentDatasetError as error:
            raise TrainingError(str(error)) from None
        grid = {"spacing": info.spacing, "orientation": info.orientation}
    if base is not None and Grid.of(base.config).recorded() != grid:
        raise TrainingError(
            f"the training data {train_data} was made on the grid {grid}, but the VolDiT {base.path} was "
            f"trained on {Grid.of(base.config).recorded()}: encode with the VQ-GAN the VolDiT was trained with"
        )
    return OmegaConf.merge(cfg, {"training": grid})


def _check_latents(cfg: DictConfig, folder: str, stage: str) -> float:
    try:
        info = load_info(folder)
    except LatentDatasetError as error:
        raise TrainingError(str(error)) from None
    p = cfg.dit.params
    expected = [p.in_channels, *p.input_size]
    if info.latent_shape != expected:
        raise TrainingError(
            f"the latents in {folder} have shape {info.latent_shape}, the config expects {expected} "
            "(dit.params in_channels + input_size); encode with a matching roi_size or change input_size"
        )
    if stage == "tgca":
        missing = [k for k in cfg.tgca.condition_keys if k not in info.condition_keys]
        if missing:
            raise TrainingError(
                f"the latents in {folder} carry no {missing}; encode with --condition-keys {missing[0]}"
            )
    return info.scale_factor


def _check_latent_source(cfg: DictConfig, stage: str, train_data: str, online: bool) -> None:
    """training.use_precomputed_latents (a seed key), when set, must agree with what the inputs ask for:
    latents from a folder, or images from a CSV encoded online by the --vqgan checkpoint."""
    wanted = cfg.training.use_precomputed_latents
    if wanted is None or stage == "vqgan":
        return
    if wanted and online:
        raise ConfigError(
            f"training.use_precomputed_latents is true, but --train {train_data} with --vqgan encodes images "
            "online; give the latent folder from `voldit encode` as --train, or remove the key"
        )
    if not wanted and not online:
        raise ConfigError(
            f"training.use_precomputed_latents is false (encode online), but --train {train_data} is not a CSV "
            "of images given with --vqgan; pass the image CSV and --vqgan <VQ-GAN checkpoint>, or remove the key"
        )


def _provenance(stage: str, train_data: str, job: TrainJob, base: Checkpoint | None) -> dict:
    """What sampling needs beside the weights: the VQ-GAN that decodes the latents and, for TGCA, the
    label values each condition key was trained with (synthesis refuses masks with others)."""
    out: dict = {}
    if job.vqgan_checkpoint:
        out["vqgan_checkpoint"] = job.vqgan_checkpoint
    else:
        info = load_info(train_data)
        if info.vqgan_checkpoint:
            out["vqgan_checkpoint"] = info.vqgan_checkpoint
        if stage == "tgca":
            out["condition_labels"] = {k: info.labels.get(k) for k in info.condition_keys}
            out["hu_reference"] = info.hu_reference  # what synthesis's quality gate checks against
    if "vqgan_checkpoint" not in out and base is not None and base.meta.get("vqgan_checkpoint"):
        out["vqgan_checkpoint"] = base.meta["vqgan_checkpoint"]
    return out


def _estimate_scale_factor(frame: pd.DataFrame, vqgan: str, grid: Grid, limit: int = 8) -> float:
    """1 / std of the first ``limit`` training volumes' latents, read on the run's grid as its data
    loader reads them (what `voldit encode` records for a latent dataset)."""
    from voldit.data.nifti import read_volume
    from voldit.data.preprocess import prepare

    model = model_from_checkpoint(load_checkpoint(vqgan, stage="vqgan"))
    values = []
    with torch.no_grad():
        for path in frame["image"].head(limit):
            image = prepare(read_volume(path), None, grid)["image"][None]
            values.append(model.encode_stage_2_inputs(image).double().numpy().ravel())
    return float(1.0 / np.concatenate(values).std())
