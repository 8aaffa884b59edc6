"""Reading a manifest row's volumes, the image and its masks on one grid: for encoding, and preprocessed
for training."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from voldit.data.nifti import Volume, VolumeError, check_same_grid, read_volume
from voldit.data.preprocess import Grid, prepare

log = logging.getLogger(__name__)


def read_row(row: dict, mask_keys: Sequence[str]) -> tuple[Volume, dict[str, Volume]]:
    """A manifest row's image and masks (float32, in stored voxel order), each mask checked to share the image's grid;
    VolumeError names the row, the column and the reason."""
    image = read_volume(row["image"])
    masks = {}
    for key in mask_keys:
        masks[key] = read_volume(row[key])
        check_same_grid(image, masks[key], f"{row['id']}: {key}")
    return image, masks


class VolumeLoader:
    """Row {id, image, <key>...} of paths -> [preprocessed {id, image (1, *roi) float32, <key>..., affine}],
    or [] with a warning naming the row and the reason when its files cannot be used (corrupt, not 3D,
    a mask on another grid): one bad CT among thousands must not stop a training run."""

    def __init__(self, grid: Grid | Sequence[int], train: bool, mask_keys: Sequence[str] = ()) -> None:
        self.grid, self.train, self.mask_keys = Grid.of(grid), train, list(mask_keys)

    def __call__(self, row: dict) -> list[dict]:
        try:
            image, masks = read_row(row, self.mask_keys)
        except VolumeError as error:
            log.warning("skipping row %s: %s", row["id"], error)
            return []
        out = prepare(image, masks, self.grid, train=self.train)
        result = {"id": row["id"], "image": out["image"].numpy(), "affine": out["affine"]}
        for key in self.mask_keys:
            result[key] = out[key].numpy()
        return [result]
