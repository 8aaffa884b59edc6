"""Ray Data sources: NIfTI volumes (paths through the dataset, decoded late, one volume per row) and
parquet latents (tensor columns)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from voldit import storage
from voldit.data.latents import PART_GLOB, LatentDatasetError, parts
from voldit.data.nifti import VolumeError, check_same_grid, read_volume
from voldit.data.preprocess import Grid, prepare
from voldit.training.context import VAL_ROW

log = logging.getLogger(__name__)


class VolumeLoader:
    """Row {id, image, <key>...} of paths -> [preprocessed {id, image (1, *roi) float32, <key>..., affine}],
    or [] with a warning naming the row and the reason when its files cannot be used (corrupt, not 3D,
    a mask on another grid): one bad CT among thousands must not stop a training run."""

    def __init__(self, grid: Grid | Sequence[int], train: bool, mask_keys: Sequence[str] = ()) -> None:
        self.grid, self.train, self.mask_keys = Grid.of(grid), train, list(mask_keys)

    def __call__(self, row: dict) -> list[dict]:
        try:
            image = read_volume(row["image"])
            masks = {}
            for key in self.mask_keys:
                masks[key] = read_volume(row[key])
                check_same_grid(image, masks[key], f"{row['id']}: {key}")
        except VolumeError as error:
            log.warning("skipping row %s: %s", row["id"], error)
            return []
        out = prepare(image, masks, self.grid, train=self.train)
        result = {"id": row["id"], "image": out["image"].numpy(), "affine": out["affine"]}
        for key in self.mask_keys:
            result[key] = out[key].numpy()
        return [result]


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
    dataset = ray.data.read_parquet(inner, filesystem=arrow_filesystem(fs)).select_columns(list(columns))
    if sum(fs.size(p) for p in inner) < MATERIALIZE_BELOW:
        dataset = dataset.materialize()
    return dataset


def validation_share(
    rows: Iterable[dict], batch_size: int, rank: int, world_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Worker ``rank``'s share of the whole validation set, given as ``rows`` in the same order on every
    worker: the rows whose position % world_size == rank, in batches of up to ``batch_size`` with their
    positions as VAL_ROW. Every row is validated exactly once, whatever the number of workers (Ray's
    equal split would drop the remainder)."""
    mine: list[tuple[int, dict]] = []
    for position, row in enumerate(rows):
        if position % world_size == rank:
            mine.append((position, row))
        if len(mine) == batch_size:
            yield _collate(mine)
            mine = []
    if mine:
        yield _collate(mine)


def _collate(rows: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
    batch = {key: torch.from_numpy(np.stack([row[key] for _, row in rows])) for key in rows[0][1]}
    batch[VAL_ROW] = torch.tensor([position for position, _ in rows], dtype=torch.int64)
    return batch


def arrow_filesystem(fs):
    """An fsspec filesystem as pyarrow's, so Ray Data reads with the same endpoint and credentials."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
