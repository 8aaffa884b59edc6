"""Encoding CT (and masks) into latents: one callable that reads, preprocesses, encodes and writes a part.

It knows nothing of Ray: Ray Data runs it as an actor (one model load per actor), tests call it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from voldit.builders import model_from_checkpoint
from voldit.checkpoint import load_checkpoint
from voldit.data.intensity import unit_to_hu
from voldit.data.latents import write_part
from voldit.data.nifti import VolumeError, as_labels, check_same_grid, label_values, read_volume
from voldit.data.preprocess import Grid, prepare
from voldit.data.workers import io_workers, load_rows
from voldit.qc import label_histograms

log = logging.getLogger(__name__)


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
        image = read_volume(row["image"])
        masks, labels = {}, {}
        for key in self.condition_keys:
            masks[key] = read_volume(row[key], dtype=np.float32)
            check_same_grid(image, masks[key], f"{row['id']}: {key}")
            whole = as_labels(masks[key].array)
            if whole is None:
                raise VolumeError(f"{row['id']}: {key} {row[key]} is not a label map (non-integer values)")
            labels[key] = label_values(whole).tolist()  # over the whole mask: what synthesis may be given
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
