"""The shared training loop driven from a plan without Ray: every stage trains, validates every row,
checkpoints what sampling needs and resumes, with data read in this process (an in-memory RunContext)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS
from voldit.builders import describe
from voldit.checkpoint import load_checkpoint
from voldit.config import load_config
from voldit.data.latents import load_info, read_latents
from voldit.data.rows import VolumeLoader
from voldit.training.context import RunContext, validation_share
from voldit.training.loop import fit
from voldit.training.plan import build_stage, plan
from voldit.training.stages import DiffusionStage, compiles

SHORT = ["training.n_epochs=2", "training.eval_freq=1", "training.log_every_n_steps=1000"]


def _rows(run, split: str) -> list[dict]:
    """A split's rows as the Ray datasets give them: preprocessed volumes, or the latent columns."""
    if run.volumes:
        loader = VolumeLoader(run.grid, train=False)
        rows = [row for record in run.volumes[split].to_dict("records") for row in loader(record)]
        return [{"image": row["image"]} for row in rows]
    columns = read_latents(run.latents[split], run.columns)
    return [{k: np.asarray(columns[k][i]) for k in run.columns} for i in range(len(columns["latent"]))]


def _context(run, reports: list) -> RunContext:
    data = {split: _rows(run, split) for split in ("train", *(["val"] if run.job.has_validation else []))}

    def batches(split: str, batch_size: int, epoch: int, shuffle: bool):
        rows = data[split]
        if split == "val":
            return validation_share(iter(rows), batch_size, rank=0, world_size=1)
        order = np.random.default_rng(epoch).permutation(len(rows)) if shuffle else range(len(rows))
        full = len(rows) - len(rows) % batch_size if shuffle else len(rows)  # drop_last, as Ray does
        return (
            {k: torch.from_numpy(np.stack([rows[i][k] for i in order[s : s + batch_size]])) for k in rows[0]}
            for s in range(0, full, batch_size)
        )

    return RunContext(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        batches=batches,
        report=reports.append,
        run_dir=Path(run.job.run_dir),
        has_validation=run.job.has_validation,
    )


def _fit(run) -> list[dict]:
    reports: list[dict] = []
    ctx = _context(run, reports)
    ctx.resume_from = ctx.checkpoints.resume_point(None)
    cfg = load_config(run.job.config)
    fit(build_stage(run.job, cfg, ctx), ctx, cfg)
    return reports


def test_planning_and_the_loop_import_without_ray():
    code = (
        "import sys, voldit.training.plan, voldit.training.sweeps, voldit.training.loop;"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_every_stage_fits_from_its_plan_without_ray(crops, crop_latents, tmp_path):
    # VQ-GAN on the real CT crops, preprocessed as the training dataset does.
    cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml", overrides=[*SHORT, "training.max_steps=2"])
    vq = plan(cfg, "vqgan", str(crops["train"]), str(crops["val"]), name="vq", storage_url=str(tmp_path))
    reports = _fit(vq)
    assert reports[-1]["step"] == 2 and reports[-1]["val_samples"] == len(crops["rows"]) - 10
    assert np.isfinite(reports[-1]["loss"]) and np.isfinite(reports[-1]["val_loss"])
    meta = load_checkpoint(f"{vq.job.run_dir}/checkpoints/latest", stage="vqgan").meta
    assert (meta["step"], meta["epoch_step"]) == (2, 2)  # stopped mid-epoch: a resume knows where

    # VolDiT on the latents: two epochs, validated after the second (eval_freq 2), the latent dataset's
    # scale factor and VQ-GAN in its checkpoint.
    data = (str(crop_latents["train"]), str(crop_latents["val"]))
    cfg = load_config(CONFIGS / "tiny" / "dit.yaml", overrides=[*SHORT, "training.eval_freq=2"])
    dit = plan(cfg, "dit", *data, name="dit", storage_url=str(tmp_path))
    reports = _fit(dit)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert "val_loss" not in reports[0] and reports[1]["val_samples"] == len(crops["rows"]) - 10  # every row
    latest = load_checkpoint(f"{dit.job.run_dir}/checkpoints/latest", stage="dit")
    info = load_info(crop_latents["train"])
    assert latest.meta["scale_factor"] == info.scale_factor
    assert latest.meta["vqgan_checkpoint"] == info.vqgan_checkpoint
    assert latest.meta["best_val_loss"] == reports[1]["val_loss"]

    # Run again with a third epoch: it resumes from the checkpoint instead of starting over.
    more = plan(
        load_config(CONFIGS / "tiny" / "dit.yaml", overrides=[*SHORT, "training.n_epochs=3"]),
        "dit",
        *data,
        name="dit",
        storage_url=str(tmp_path),
    )
    resumed = _fit(more)
    assert [r["epoch"] for r in resumed] == [3]
    assert resumed[-1]["step"] == reports[-1]["step"] * 3 // 2

    # TGCA on the VolDiT: the architecture comes from the VolDiT, the mask labels into the checkpoint.
    cfg = load_config(CONFIGS / "tiny" / "tgca.yaml", overrides=[*SHORT, "training.n_epochs=1"])
    tgca = plan(
        cfg, "tgca", *data, dit=f"{dit.job.run_dir}/checkpoints/best", name="tgca", storage_url=str(tmp_path)
    )
    assert tgca.job.config["dit"] == dict(latest.config.dit) and tgca.columns == ["latent", "mask"]
    reports = _fit(tgca)
    assert reports[-1]["epoch"] == 1 and np.isfinite(reports[-1]["loss"])
    meta = load_checkpoint(f"{tgca.job.run_dir}/checkpoints/latest", stage="tgca").meta
    assert meta["condition_labels"] == {"mask": info.labels["mask"]}
    assert meta["scale_factor"] == latest.meta["scale_factor"]  # the frozen VolDiT's


def _stage(overrides=()):
    cfg = load_config(CONFIGS / "tiny" / "dit.yaml", overrides=list(overrides))
    ctx = RunContext(0, 1, torch.device("cpu"), None, lambda metrics: None, Path("."), has_validation=False)
    return DiffusionStage(cfg, ctx, scale_factor=1.0), cfg


def test_the_fast_defaults_train_as_the_plain_paths_do():
    """Fused AdamW (the default) updates the weights as the for-each kernel does, and the blocks are
    compiled by default only on a GPU (compiled blocks predict as eager ones: test_dit)."""
    latents = torch.randn(6, 8, 8, 8, 4, generator=torch.Generator().manual_seed(0))
    weights = {}
    for fused in (True, False):
        stage, cfg = _stage([f"optim.fused={fused}"])
        assert stage.optimizer.defaults["fused"] is (True if fused else None)
        for i in range(3):
            stage.train_step({"latent": latents[2 * i : 2 * i + 2]}, epoch=0)
        weights[fused] = [p.detach().clone() for p in stage.model.parameters()]
    start = _stage()[0].model.parameters()
    moved = max((a - b).abs().max().item() for a, b in zip(weights[True], start, strict=True))
    assert moved > 1e-4  # the steps changed the weights...
    for a, b in zip(weights[True], weights[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # ...the same way
    cfg = load_config(CONFIGS / "tiny" / "dit.yaml")
    assert cfg.optim.fused and cfg.training.compile is None
    assert not compiles(cfg, torch.device("cpu")) and compiles(cfg, torch.device("cuda"))
    off = load_config(CONFIGS / "tiny" / "dit.yaml", overrides=["training.compile=false"])
    assert not compiles(off, torch.device("cuda"))


def test_progress_lines_give_the_mfu_where_the_peak_is_known(crop_latents, tmp_path, caplog):
    data = (str(crop_latents["train"]), str(crop_latents["val"]))
    lines = {}
    for peak in (None, 1e9):
        extra = [f"training.peak_flops={peak}"] if peak else []
        cfg = load_config(
            CONFIGS / "tiny" / "dit.yaml",
            overrides=[*SHORT, "training.n_epochs=1", "training.log_every_n_steps=1", *extra],
        )
        run = plan(cfg, "dit", *data, name=f"mfu{peak}", storage_url=str(tmp_path))
        caplog.clear()
        with caplog.at_level("INFO", logger="voldit"):
            reports = _fit(run)
        lines[peak] = [r.getMessage() for r in caplog.records if "samples/s" in r.getMessage()]
        if peak:
            flops = describe(load_config(run.job.config))["training_flops"]
            assert reports[-1]["mfu"] == pytest.approx(reports[-1]["samples_per_s"] * flops / peak)
        else:
            assert "mfu" not in reports[-1]  # a CPU has no peak to compare with
    assert lines[None] and not any("MFU" in line for line in lines[None])
    assert lines[1e9] and all(", MFU " in line for line in lines[1e9])  # every step line and the epoch's
