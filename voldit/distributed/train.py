"""`voldit train` on Ray: Ray Train's TorchTrainer runs the shared loop for the VQ-GAN, VolDiT and TGCA
stages. Only Ray calls live here; voldit.training.plan checks the inputs and plans the run first."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import ray
import ray.train
import torch
from omegaconf import DictConfig
from ray.train.torch import TorchTrainer

from voldit import storage as storage_lib
from voldit.config import load_config
from voldit.data.latents import LatentDatasetError
from voldit.distributed.data import latent_dataset, volume_dataset
from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage, verbose
from voldit.training.context import RunContext, TrainingError, validation_share
from voldit.training.loop import fit
from voldit.training.plan import FAILURE_ENV, TrainJob, TrainPlan, TrainResult, build_stage, finish, plan
from voldit.training.store import CheckpointStore

__all__ = ["FAILURE_ENV", "TrainResult", "train"]


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
        fit(build_stage(job, cfg, ctx), ctx, cfg)


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
    run = plan(cfg, stage, train_data, val_data, dit, vqgan, name, storage)
    # Locally, leave CPUs beyond the train workers for Ray Data's read tasks (without them, a 2-core
    # machine with 2 workers waits forever).
    ensure_ray(address, num_cpus=max(os.cpu_count() or 1, workers + 2))
    require_shared_storage({"--storage": storage})
    require_gpus(gpus_per_worker, workers)
    ingest = _ordered()  # before the datasets are made: they capture the data context
    ray_storage: dict = {"storage_path": run.storage_path}
    if run.job.remote_run_dir:
        fs, inner = storage_lib.filesystem(run.storage_path)
        ray_storage = {"storage_path": inner, "storage_filesystem": storage_lib.arrow_filesystem(fs)}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=asdict(run.job),
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
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets=_datasets(run),
        # Only the training set is split (equally, so every worker takes as many steps); validation is
        # shared out row by row in the workers, so no row is dropped.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise TrainingError(f"training failed after {max_failures} restart(s): {error}") from error
    return finish(run.job, dict(result.metrics or {}))


def _ordered():
    # Blocks in a fixed order, so a seeded run (and a resumed one) sees the same batches. In-process runs
    # (num_workers=0) read with the driver's context, so it is set there too.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _datasets(run: TrainPlan) -> dict:
    if run.volumes:
        return {
            split: volume_dataset(frame, run.grid, train=split == "train" and run.augment).select_columns(
                run.columns
            )
            for split, frame in run.volumes.items()
        }
    try:
        return {split: latent_dataset(folder, run.columns) for split, folder in run.latents.items()}
    except LatentDatasetError as error:
        raise TrainingError(str(error)) from None
