"""`voldit train`: Ray Train's TorchTrainer around the shared loop, for the VQ-GAN, VolDiT and TGCA stages."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from omegaconf import DictConfig, OmegaConf
from ray.train.torch import TorchTrainer

from voldit import storage as storage_lib
from voldit.builders import model_from_checkpoint
from voldit.checkpoint import Checkpoint, load_checkpoint
from voldit.config import ConfigError, load_config, section_dict, stage_of
from voldit.data.latents import LatentDatasetError, load_info
from voldit.data.manifest import read_manifest
from voldit.data.preprocess import Grid
from voldit.distributed.data import arrow_filesystem, latent_dataset, validation_share, volume_dataset
from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.training.context import RunContext, TrainingError
from voldit.training.loop import fit
from voldit.training.stages import DiffusionStage, VQGANStage
from voldit.training.store import CheckpointStore

log = logging.getLogger(__name__)

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
class TrainResult:
    run_dir: Path
    metrics: dict
    checkpoint: Path | str | None  # the run's latest checkpoint
    remote_run_dir: str | None = None

    def _named(self, name: str) -> Path | str:
        if self.remote_run_dir:
            return storage_lib.join(self.remote_run_dir, "checkpoints", name)
        return self.run_dir / "checkpoints" / name

    @property
    def best(self) -> Path | str:
        return self._named("best")

    @property
    def latest(self) -> Path | str:
        return self._named("latest")


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


def _worker(job_dict: dict) -> None:
    job = TrainJob(**job_dict)
    cfg = load_config(job.config)
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    seed = cfg.training.seed

    def batches(split: str, batch_size: int, epoch: int, shuffle: bool):
        shard = ray.train.get_dataset_shard(split)
        if split == "val":  # not split by Ray: every worker reads it all and keeps its own rows
            rank, world_size = context.get_world_rank(), context.get_world_size()
            return validation_share(shard.iter_rows(), batch_size, rank, world_size)
        return shard.iter_torch_batches(
            batch_size=batch_size,
            local_shuffle_buffer_size=cfg.training.shuffle_buffer if shuffle else None,
            local_shuffle_seed=seed + epoch if shuffle else None,
            drop_last=shuffle,
        )

    ctx = RunContext(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=device,
        batches=batches,
        report=_report,
        run_dir=Path(job.run_dir),
        has_validation=job.has_validation,
        checkpoints=CheckpointStore(job.run_dir, job.remote_run_dir),
    )
    with tempfile.TemporaryDirectory(prefix="voldit-resume-") as tmp:
        # After a worker failure, or when a stopped run is started again: the run's newest complete
        # checkpoint (from the bucket for a remote run, whichever node this worker is on).
        ctx.resume_from = ctx.checkpoints.resume_point(Path(tmp) / "checkpoint")
        stage = _build_stage(job, cfg, ctx)
        if job.inject_failure and ctx.rank == 0:
            stage = _FailOnce(stage, job.inject_failure)
        fit(stage, ctx, cfg)


def _report(metrics: dict) -> None:
    """Report to Ray Train. The run's checkpoints are its own (CheckpointStore: written once, uploaded
    in the background), so Ray keeps no copy of them; but Ray's Result keeps only metrics that come with
    a checkpoint, so rank 0 attaches a few-byte one holding the metrics."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="voldit-report-") as folder:
        (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _build_stage(job: TrainJob, cfg: DictConfig, ctx: RunContext):
    if job.stage == "vqgan":
        return VQGANStage(cfg, ctx)
    base_state = None
    if job.stage == "tgca":
        base_state = load_checkpoint(job.base_checkpoint, stage="dit").model_state(use_ema=True)
    encoder = None
    if job.vqgan_checkpoint:
        encoder = model_from_checkpoint(load_checkpoint(job.vqgan_checkpoint, stage="vqgan"))
    return DiffusionStage(
        cfg, ctx, job.scale_factor, base_state=base_state, encoder=encoder, provenance=job.provenance
    )


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
    cfg: DictConfig, stage: str, train_data: str, vqgan: str | None, base: Checkpoint | None
) -> DictConfig:
    """The config with the grid (spacing, orientation) its latents were made on: recorded in the latent
    dataset, or the VQ-GAN's when encoding online. The checkpoint keeps it, so sampling reads it there."""
    if vqgan and str(train_data).endswith(".csv"):
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
    info = load_info(folder)
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


def _estimate_scale_factor(frame, vqgan: str, grid: Grid, limit: int = 8) -> float:
    from voldit.data.nifti import read_volume
    from voldit.data.preprocess import prepare

    checkpoint = load_checkpoint(vqgan, stage="vqgan")
    model = model_from_checkpoint(checkpoint)  # images on the run's grid, as its data loader reads them
    values = []
    with torch.no_grad():
        for path in frame["image"].head(limit):
            image = prepare(read_volume(path), None, grid)["image"][None]
            values.append(model.encode_stage_2_inputs(image).double().numpy().ravel())
    return float(1.0 / np.concatenate(values).std())


def train(
    cfg: DictConfig,
    stage: str,
    train_data: str,
    val_data: str | None = None,
    dit: str | None = None,
    vqgan: str | None = None,
    name: str = "voldit",
    storage: str = "outputs",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    max_failures: int = 0,
    address: str | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train one stage with ``workers`` DDP workers (0: in this process). Re-running with the same
    ``name`` and ``storage`` resumes from the latest checkpoint."""
    if stage not in ("vqgan", "dit", "tgca"):
        raise ConfigError(f"--stage must be vqgan, dit or tgca, got {stage!r}")
    checks = {"storage": storage, "training data": train_data, "validation data": val_data, "--dit": dit}
    for what, url in {**checks, "--vqgan": vqgan}.items():
        if url:
            storage_lib.check(url, what)  # one clear error before any work: endpoint, credentials, bucket
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
    _check_latent_source(cfg, stage, train_data, vqgan)
    if stage != "vqgan":
        cfg = _with_data_grid(cfg, stage, train_data, vqgan, base if stage == "tgca" else None)
    # Locally, leave CPUs beyond the train workers for Ray Data's read tasks (without them, a 2-core
    # machine with 2 workers waits forever).
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, workers + 2))
    require_shared_storage({"--storage": storage})
    require_gpus(gpus_per_worker, workers)
    ingest = _ordered()  # before the datasets are made: they capture the data context
    storage_path = storage_lib.resolve(storage)
    job = TrainJob(
        config={},
        stage=stage,
        run_dir=str(Path(storage_path) / name),
        inject_failure=os.environ.get(FAILURE_ENV),
    )
    ray_storage: dict = {"storage_path": storage_path}
    if storage_lib.is_remote(storage_path):
        # Checkpoints and logs are written to a local staging folder and uploaded as they complete.
        job.remote_run_dir = storage_lib.join(storage_path, name)
        digest = hashlib.sha256(job.remote_run_dir.encode()).hexdigest()[:16]
        job.run_dir = str(storage_lib.cache_root() / "runs" / digest / name)
        fs, inner = storage_lib.filesystem(storage_path)
        ray_storage = {"storage_path": inner, "storage_filesystem": arrow_filesystem(fs)}
    datasets = _datasets(cfg, stage, train_data, val_data, dit, vqgan, job)
    # The scale factor: the config's if given; for TGCA the frozen VolDiT's (it was trained with it);
    # else the latent dataset's (or the online estimate), which _datasets has set.
    if cfg.training.scale_factor is not None:
        job.scale_factor = float(cfg.training.scale_factor)
    elif stage == "tgca" and base.meta.get("scale_factor"):
        job.scale_factor = base.meta["scale_factor"]
    if stage == "tgca":
        job.base_checkpoint = storage_lib.resolve(dit)
    if stage != "vqgan":
        job.provenance = _provenance(stage, train_data, job, base if stage == "tgca" else None)
    job.config = OmegaConf.to_container(cfg, resolve=True)
    job.has_validation = "val" in datasets
    trainer = TorchTrainer(
        _worker,
        train_loop_config=asdict(job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            # GPU workers pack onto few nodes (NVLink between them); CPU workers spread over nodes, where
            # packed they would share one node's cores.
            placement_strategy="PACK" if gpus_per_worker else "SPREAD",
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **ray_storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Only the training set is split (equally, so every worker takes as many steps); validation is
        # shared out row by row in the workers, so no row is dropped.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingError(f"training failed after {max_failures} restart(s): {error}") from error
    metrics = dict(result.metrics or {})
    if metrics.get("diverged"):
        raise TrainingError(
            f"the loss became {metrics['loss']} at step {metrics['step'] + 1} (epoch {metrics['epoch'] + 1}); "
            f"training stopped. The last good checkpoint is "
            f"{storage_lib.join(job.remote_run_dir or job.run_dir, 'checkpoints', 'latest')}"
        )
    done = TrainResult(
        run_dir=Path(job.run_dir), metrics=metrics, checkpoint=None, remote_run_dir=job.remote_run_dir
    )
    done.checkpoint = done.latest
    return done


def _check_latent_source(cfg: DictConfig, stage: str, train_data: str, vqgan: str | None) -> None:
    """training.use_precomputed_latents (a seed key), when set, must agree with what the inputs ask for:
    latents from a folder, or images from a CSV encoded online by the --vqgan checkpoint."""
    wanted = cfg.training.use_precomputed_latents
    if wanted is None or stage == "vqgan":
        return
    online = bool(vqgan) and str(train_data).endswith(".csv")
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


def _ordered():
    # Blocks in a fixed order, so a seeded run (and a resumed one) sees the same batches. In-process runs
    # (num_workers=0) read with the driver's context, so it is set there too.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _datasets(cfg, stage, train_data, val_data, dit, vqgan, job: TrainJob) -> dict:
    grid = Grid.of(cfg)
    if stage == "vqgan" or (vqgan and str(train_data).endswith(".csv")):
        frames = {"train": read_manifest(train_data, ["image"])}
        if val_data:
            frames["val"] = read_manifest(val_data, ["image"])
        if stage != "vqgan":
            job.vqgan_checkpoint = storage_lib.resolve(vqgan)
            job.scale_factor = _estimate_scale_factor(frames["train"], vqgan, grid)
            log.info("scale factor estimated from the first training volumes: %.4f", job.scale_factor)
        augment = cfg.training.augment
        return {
            split: volume_dataset(frame, grid, train=split == "train" and augment).select_columns(["image"])
            for split, frame in frames.items()
        }
    columns = ["latent", *(cfg.tgca.condition_keys if stage == "tgca" else [])]
    try:
        job.scale_factor = _check_latents(cfg, train_data, stage)
        datasets = {"train": latent_dataset(train_data, columns)}
        if val_data:
            _check_latents(cfg, val_data, stage)
            datasets["val"] = latent_dataset(val_data, columns)
    except LatentDatasetError as error:
        raise TrainingError(str(error)) from None
    return datasets
