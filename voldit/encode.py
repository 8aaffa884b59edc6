"""Encoding CT (and masks) into latents: the plan of a run (which rows are left), one callable that reads,
preprocesses, encodes and writes a part, and the run's summary.

It knows nothing of Ray: voldit.distributed.encode runs the callable as Ray Data actors (one model load
per actor) over the plan's rows; tests call it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from voldit import storage
from voldit.builders import model_from_checkpoint
from voldit.checkpoint import load_checkpoint
from voldit.data.intensity import unit_to_hu
from voldit.data.latents import (
    LatentDatasetInfo,
    committed_ids,
    remove_stale_temporaries,
    summarise,
    write_part,
)
from voldit.data.manifest import read_manifest
from voldit.data.nifti import label_values, mask_labels
from voldit.data.preprocess import Grid, prepare
from voldit.data.rows import read_row
from voldit.data.workers import io_workers, load_rows
from voldit.qc import label_histograms

log = logging.getLogger(__name__)

ERRORS_FILE = "errors.csv"  # in the output folder: the rows that could not be encoded, and why


@dataclass
class EncodeSummary:
    total: int
    skipped: int
    encoded: int
    failed: list[dict] = field(default_factory=list)
    info: LatentDatasetInfo | None = None


@dataclass
class EncodePlan:
    """A run's inputs, checked and resolved, and the manifest rows not yet in the output."""

    csv: str
    vqgan: str
    output: str
    grid: Grid
    condition_keys: list[str]
    todo: pd.DataFrame
    summary: EncodeSummary


def plan(
    csv: str | Path, vqgan: str | Path, output: str | Path, condition_keys: Sequence[str] = ()
) -> EncodePlan:
    """Check the inputs before any work (storage, checkpoint, manifest) and find the rows left to encode:
    those whose part was not committed by an earlier run; half-written parts of a crashed run go."""
    for url, what in ((csv, "manifest"), (output, "output"), (vqgan, "VQ-GAN checkpoint")):
        storage.check(url, what)  # one clear error before any work: endpoint, credentials, bucket
    output, vqgan = storage.resolve(output), storage.resolve(vqgan)
    grid = Grid.of(
        load_checkpoint(vqgan, stage="vqgan").config
    )  # the VQ-GAN's roi_size, spacing, orientation
    frame = read_manifest(csv, ["image", *condition_keys], check_files=False)
    if removed := remove_stale_temporaries(output):
        log.info("removed %d half-written part(s) from an interrupted run", removed)
    todo = frame[~frame["id"].isin(committed_ids(output))]
    summary = EncodeSummary(total=len(frame), skipped=len(frame) - len(todo), encoded=0)
    log.info("%d rows in %s: %d already encoded, %d to do", len(frame), csv, summary.skipped, len(todo))
    return EncodePlan(str(csv), vqgan, output, grid, list(condition_keys), todo, summary)


def finish(run: EncodePlan, failed: list[dict]) -> EncodeSummary:
    """Record the failed rows in ERRORS_FILE (removed once none fail) and the dataset's info, with the
    scale factor over every part."""
    summary = run.summary
    summary.failed, summary.encoded = failed, len(run.todo) - len(failed)
    errors = storage.join(run.output, ERRORS_FILE)
    if failed:
        storage.write_text(errors, pd.DataFrame(failed).to_csv(index=False))
    elif storage.exists(errors):
        storage.remove(errors)
    if summary.encoded or summary.skipped:
        summary.info = summarise(run.output, run.grid, run.condition_keys, run.vqgan)
    return summary


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """Batch of manifest rows {id, image, <key>...} -> one committed part; returns one status per row.

    Rows that cannot be read (missing, corrupt, not 3D, NaN, mask on another grid) are reported with
    their reason and left out of the part; the others are still encoded.
    """

    def __init__(
        self,
        vqgan_checkpoint: str | Path,
        output: str | Path,
        condition_keys: Sequence[str] = (),
        device: str | None = None,
    ) -> None:
        ckpt = load_checkpoint(vqgan_checkpoint, stage="vqgan")
        self.device = torch.device(device) if device else default_device()
        self.model = model_from_checkpoint(ckpt).to(self.device)
        self.grid = Grid.of(ckpt.config)  # the VQ-GAN's grid: roi_size, spacing and orientation
        self.output = str(output)
        self.condition_keys = list(condition_keys)
        self._workers = io_workers()  # a batch's rows read and prepared in parallel

    def _load(self, row: dict) -> dict:
        image, masks = read_row(row, self.condition_keys)
        labels = {  # over the whole mask: what synthesis may be given
            key: label_values(mask_labels(mask, f"{row['id']}: {key} {row[key]}")).tolist()
            for key, mask in masks.items()
        }
        prepared = prepare(image, masks, self.grid, train=False)
        out = {
            "id": row["id"],
            "image": row["image"],
            "tensor": prepared["image"],
            "affine": prepared["affine"],
            "labels": labels,
        }
        hu = unit_to_hu(prepared["image"][0]).numpy()  # the crop in the HU window the model generates
        out["hu_histograms"] = {}
        for key in self.condition_keys:
            out[key] = prepared[key].round().to(torch.int16).numpy()
            out[f"{key}_path"] = row[key]
            out["hu_histograms"][key] = label_histograms(hu, out[key][0])  # the quality gate's reference
        return out

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        start = time.perf_counter()
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        status = {r["id"]: "" for r in rows}
        loaded = []
        for row, out, error in load_rows(self._workers, self._load, rows):
            if error:
                status[row["id"]] = error
            else:
                loaded.append(out)
        if loaded:
            images = torch.stack([r.pop("tensor") for r in loaded]).to(self.device)  # (B, 1, X, Y, Z)
            latents = self.model.encode_stage_2_inputs(images).float().cpu().numpy()
            for row, latent in zip(loaded, latents, strict=True):
                row["latent"] = latent
            write_part(self.output, loaded, self.condition_keys)
        seconds = (time.perf_counter() - start) / len(rows)
        return {
            "id": [r["id"] for r in rows],
            "image": [r["image"] for r in rows],
            "error": [status[r["id"]] for r in rows],
            "seconds": [seconds] * len(rows),
        }
