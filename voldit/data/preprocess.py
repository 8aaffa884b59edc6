"""Image and mask preprocessing onto the model's grid: fixed HU window, reorientation and resampling to
the grid's orientation and spacing (when the config sets them), pad, crop to roi_size, light augmentation.

Built from MONAI's dictionary transforms so an image and its masks receive the same spatial operations;
images are interpolated linearly and padded with air, masks by nearest neighbour and padded with 0,
and only images get the HU window. Every step is invertible: a volume generated on the model's grid is
put back exactly onto a mask's own grid (`PreparedCondition.restore`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    Lambdad,
    Orientationd,
    RandFlipd,
    RandRotated,
    RandSpatialCropd,
    Spacingd,
    SpatialCropd,
    SpatialPadd,
)

from voldit.data.intensity import hu_to_unit
from voldit.data.nifti import Volume

ROTATION_RANGE = 0.0872665  # 5 degrees about each axis, with probability 0.2, as the seed augments
_AXES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's convention: "RAS" axes point right, anterior, up
FIELDS_OF_VIEW = ("label", "centre")  # where synthesis places the model's field of view in a mask


@dataclass(frozen=True)
class Grid:
    """The model's voxel grid: images and masks are reoriented to ``orientation`` (axis codes, e.g. RAS;
    None: as stored), resampled to ``spacing`` (mm per axis; None: as stored), then padded and cropped to
    ``roi_size`` voxels. A config's training section sets it; latents and checkpoints record it."""

    roi_size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None

    @classmethod
    def of(cls, value) -> Grid:
        """A Grid from a Grid, a config (its training section), or a bare roi_size (stored order and spacing)."""
        if isinstance(value, Grid):
            return value
        training = getattr(value, "training", None)
        if training is None:
            return cls(tuple(int(n) for n in value))
        spacing = training.get("spacing")
        return cls(
            tuple(int(n) for n in training.roi_size),
            tuple(float(s) for s in spacing) if spacing else None,
            training.get("orientation") or None,
        )

    def recorded(self) -> dict:
        """What latents and checkpoints store: {"spacing": [..] or None, "orientation": str or None}."""
        return {"spacing": list(self.spacing) if self.spacing else None, "orientation": self.orientation}

    def affine(self, spacing: Sequence[float] | None = None) -> np.ndarray:
        """A voxel-to-world affine for a volume of roi_size on this grid, centred on the origin (for
        volumes sampled without a mask); where the grid leaves them open, ``spacing`` (else 1 mm) and
        the RAS axes."""
        spacing = self.spacing or spacing or (1.0, 1.0, 1.0)
        affine = np.eye(4)
        for axis, code in enumerate(self.orientation or "RAS"):
            world, sign = _AXES[code]
            affine[:, axis] = 0.0
            affine[world, axis] = sign * spacing[axis]
        affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(self.roi_size) - 1) / 2)
        return affine


def _resampling(keys: list[str], mask_keys: Sequence[str], grid: Grid, image: bool) -> list:
    """Reorientation and resampling onto the grid (nothing when it keeps the stored order and spacing)."""
    steps = []
    missing = not image  # masks alone (synthesis): "image" is not there
    if grid.orientation:
        steps.append(Orientationd(keys, axcodes=grid.orientation, labels=_LABELS, allow_missing_keys=missing))
    if grid.spacing:
        n = len(mask_keys)
        steps.append(
            Spacingd(
                keys,
                pixdim=grid.spacing,
                mode=[*(["bilinear"] if image else []), *["nearest"] * n],
                padding_mode=[*(["border"] if image else []), *["zeros"] * n],
                allow_missing_keys=missing,
            )
        )
    return steps


def preprocessing(
    grid: Grid | Sequence[int],
    train: bool,
    mask_keys: Sequence[str] = (),
    image: bool = True,
    crop: bool = True,
) -> Compose:
    """Transforms over {"image": (1, X, Y, Z), <mask key>: (1, X, Y, Z), ...} tensors with affines
    (without "image" when ``image`` is False: the masks alone, as conditional sampling reads them;
    without the final crop when ``crop`` is False: synthesis places its field of view itself)."""
    grid = Grid.of(grid)
    roi_size = grid.roi_size
    keys = ["image", *mask_keys] if image else list(mask_keys)
    steps = []
    if image:
        steps.append(Lambdad("image", hu_to_unit))
    steps += _resampling(keys, mask_keys, grid, image)
    if image:
        steps.append(
            SpatialPadd("image", roi_size, mode="constant", value=-1.0)
        )  # -1 is air after the window
    if mask_keys:
        steps.append(
            SpatialPadd(list(mask_keys), roi_size, mode="constant", value=0, allow_missing_keys=not image)
        )
    if train:
        steps += [
            RandRotated(
                keys,
                range_x=ROTATION_RANGE,
                range_y=ROTATION_RANGE,
                range_z=ROTATION_RANGE,
                prob=0.2,
                mode=["bilinear", *["nearest"] * len(mask_keys)],
                padding_mode="border",
            ),
            RandFlipd(keys, spatial_axis=1, prob=0.5),
            RandSpatialCropd(keys, roi_size=roi_size, random_size=False),
        ]
    elif crop:
        # Without an image, one mask alone can be put through the inverse (a generated volume's way back).
        steps.append(CenterSpatialCropd(keys, roi_size=roi_size, allow_missing_keys=not image))
    return Compose(steps)


def prepare(
    image: Volume,
    masks: dict[str, Volume] | None = None,
    roi_size: Grid | Sequence[int] = (512, 512, 256),
    train: bool = False,
    seed: int | None = None,
) -> dict[str, torch.Tensor | np.ndarray]:
    """Preprocess one image (HU) and its masks into (1, *roi_size) float tensors and the crop's affine,
    on the model's grid (a Grid; a bare roi_size keeps the stored orientation and spacing).

    ``seed`` fixes the random augmentation of a training sample.
    """
    masks = masks or {}
    data = {"image": MetaTensor(torch.from_numpy(image.array[None]), affine=torch.from_numpy(image.affine))}
    for key, mask in masks.items():
        data[key] = MetaTensor(
            torch.from_numpy(mask.array[None].astype(np.float32)), affine=torch.from_numpy(mask.affine)
        )
    transform = preprocessing(roi_size, train, list(masks))
    if seed is not None:
        transform.set_random_state(seed)
    out = transform(data)
    result = {key: value.as_tensor().float() for key, value in out.items()}
    result["affine"] = out["image"].affine.numpy().astype(np.float64)
    return result


@dataclass
class PreparedCondition:
    """Masks as the model sees them, and how to put a generated volume back on the masks' own grid."""

    condition: torch.Tensor  # (K, *roi_size) float, the masks stacked in condition-key order
    affine: np.ndarray  # (4, 4) of the model's field of view
    source_affine: np.ndarray  # (4, 4) of the masks' own grid, where restored volumes live
    source_shape: tuple[int, int, int]
    field_of_view: dict  # which part of the masks the model saw (see `_field_of_view`)
    _reference: MetaTensor  # the first mask after preprocessing: carries the operations to undo
    _transform: Compose

    def restore(self, volume: torch.Tensor) -> torch.Tensor:
        """A generated (*roi_size) volume in [-1, 1] -> the masks' (X, Y, Z) grid: crop, pad, resampling
        and reorientation undone (linear interpolation where the masks were resampled by nearest
        neighbour); voxels outside the model's field of view are air (-1)."""
        # MONAI's inverse pads (and resamples out of bounds) with 0; shifting air to 0 makes that air.
        shifted = MetaTensor(volume[None].float() + 1.0, affine=self._reference.affine)
        shifted.applied_operations = copy.deepcopy(self._reference.applied_operations)
        for op in shifted.applied_operations:
            if "mode" in op.get("extra_info", {}) and op["extra_info"]["mode"] == "nearest":
                op["extra_info"]["mode"] = "bilinear"  # an image goes back linearly, as images are resampled
        key = self._transform.transforms[0].keys[0]
        restored = self._transform.inverse({key: shifted})[key].as_tensor()[0] - 1.0
        out = torch.full_like(restored, -1.0)  # air outside the field of view, exactly
        inside = tuple(slice(a, b) for a, b in self.field_of_view["voxels"])
        out[inside] = restored[inside].clamp(-1.0, 1.0)
        return out


def prepare_condition(
    masks: dict[str, Volume], roi_size: Grid | Sequence[int], field_of_view: str = "centre"
) -> PreparedCondition:
    """Masks (one label map per condition key, all on one grid) brought onto the model's grid as
    `voldit encode` prepares them for training, with the field of view (roi_size voxels) placed at the
    ``field_of_view``: "centre" of the volume, or the centre of the "label"led region (kept inside the
    volume where it fits)."""
    if not masks:
        raise ValueError("no masks given")
    if field_of_view not in FIELDS_OF_VIEW:
        raise ValueError(f"field_of_view is {field_of_view!r}; use one of {FIELDS_OF_VIEW}")
    grid = Grid.of(roi_size)
    keys = list(masks)
    data = {
        key: MetaTensor(
            torch.from_numpy(mask.array[None].astype(np.float32)), affine=torch.from_numpy(mask.affine)
        )
        for key, mask in masks.items()
    }
    before = preprocessing(grid, train=False, mask_keys=keys, image=False, crop=False)
    out = before(data)
    shape = np.asarray(out[keys[0]].shape[1:])
    size = np.asarray(grid.roi_size)
    start = (shape - size) // 2  # the centre, as training crops
    if field_of_view == "label":
        labelled = np.argwhere(np.any([out[key].as_tensor()[0].numpy() != 0 for key in keys], axis=0))
        if len(labelled):
            centre = (labelled.min(axis=0) + labelled.max(axis=0) + 1) / 2
            start = np.clip(np.round(centre - size / 2).astype(int), 0, shape - size)
    # allow_missing_keys: `restore` puts one volume back through the first key's operations alone.
    crop = SpatialCropd(
        keys, roi_start=start.tolist(), roi_end=(start + size).tolist(), allow_missing_keys=True
    )
    out = crop(out)
    transform = Compose([*before.transforms, crop])
    first = next(iter(masks.values()))
    affine = out[keys[0]].affine.numpy().astype(np.float64)
    return PreparedCondition(
        condition=torch.cat([out[key].as_tensor().float() for key in keys]),
        affine=affine,
        source_affine=np.asarray(first.affine, dtype=np.float64),
        source_shape=tuple(first.array.shape),
        field_of_view=_field_of_view(masks, affine, grid.roi_size),
        _reference=out[keys[0]],
        _transform=transform,
    )


def _field_of_view(masks: dict[str, Volume], affine: np.ndarray, roi_size: Sequence[int]) -> dict:
    """The model's field of view in the masks' own terms: the voxel ranges of the masks' grid whose centres
    it covers (half-open, clipped to the volume; the bounding box where the two grids are not aligned),
    its extent in world mm, and the fraction of labelled voxels it leaves out."""
    first = next(iter(masks.values()))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners = corners * np.asarray(roi_size) - 0.5  # voxel edges, not centres
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    source = (world - first.affine[:3, 3]) @ np.linalg.inv(first.affine[:3, :3]).T  # voxel centres: integers
    shape = np.asarray(first.array.shape)
    low = np.clip(np.ceil(source.min(axis=0) - 1e-4).astype(int), 0, shape)  # centres inside the box
    high = np.clip(np.floor(source.max(axis=0) + 1e-4).astype(int) + 1, 0, shape)
    labelled = np.any([mask.array != 0 for mask in masks.values()], axis=0)
    total = int(labelled.sum())
    inside = int(labelled[low[0] : high[0], low[1] : high[1], low[2] : high[2]].sum())
    return {
        "voxels": [[int(a), int(b)] for a, b in zip(low, high, strict=True)],
        "mm": [
            [round(float(a), 2), round(float(b), 2)] for a, b in zip(world.min(0), world.max(0), strict=True)
        ],
        "labelled_voxels": total,
        "cut": round(1.0 - inside / total, 4) if total else 0.0,
    }
