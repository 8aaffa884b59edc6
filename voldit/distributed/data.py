"""Ray Data sources: NIfTI volumes (paths through the dataset, decoded late, one volume per row) and
parquet latents (tensor columns)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import ray

from voldit import storage
from voldit.data.latents import PART_GLOB, LatentDatasetError, parts
from voldit.data.preprocess import Grid
from voldit.data.rows import VolumeLoader


def volume_dataset(
    frame: pd.DataFrame,
    grid: Grid | Sequence[int],
    train: bool,
    mask_keys: Sequence[str] = (),
    rows_per_task: int = 1,
) -> ray.data.Dataset:
    """A dataset of preprocessed volumes from a manifest; files are read and decoded in the map step, so
    blocks hold paths until a volume is needed, and one volume per row.

    ``rows_per_task`` > 1 amortises Ray's per-task cost for small volumes; keep 1 for full-size CT.
    """
    records = frame[["id", "image", *mask_keys]].to_dict("records")
    dataset = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // rows_per_task)))
    return dataset.flat_map(VolumeLoader(grid, train, mask_keys))


MATERIALIZE_BELOW = 1 << 30  # bytes of parquet: smaller latent sets are read once and kept in memory


def latent_dataset(folder: str | Path, columns: Sequence[str] = ("latent",)) -> ray.data.Dataset:
    """The committed parquet parts of a latent folder (half-written temporaries are never read).

    Sets under MATERIALIZE_BELOW bytes are materialised, so epochs after the first skip the parquet read.
    """
    found = parts(folder)
    if not found:
        raise LatentDatasetError(f"{folder} holds no latent parts ({PART_GLOB}); run `voldit encode` first")
    fs, _ = storage.filesystem(folder)
    inner = [storage.filesystem(p)[1] for p in found]
    dataset = ray.data.read_parquet(inner, filesystem=storage.arrow_filesystem(fs)).select_columns(
        list(columns)
    )
    if sum(fs.size(p) for p in inner) < MATERIALIZE_BELOW:
        dataset = dataset.materialize()
    return dataset
