"""Image and mask preprocessing as the seed trains: fixed HU window, pad, crop to roi_size, light augmentation.

Built from MONAI's dictionary transforms so an image and its masks receive the same spatial operations;
images are interpolated linearly and padded with air, masks by nearest neighbour and padded with 0,
and only images get the HU window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    Lambdad,
    RandFlipd,
    RandRotated,
    RandSpatialCropd,
    SpatialPadd,
)

from voldit.data.intensity import hu_to_unit
from voldit.data.nifti import Volume

ROTATION_RANGE = 0.0872665  # 5 degrees about each axis, with probability 0.2, as the seed augments


def preprocessing(
    roi_size: Sequence[int], train: bool, mask_keys: Sequence[str] = (), image: bool = True
) -> Compose:
    """Transforms over {"image": (1, X, Y, Z), <mask key>: (1, X, Y, Z), ...} tensors with affines
    (without "image" when ``image`` is False: the masks alone, as conditional sampling reads them)."""
    keys = ["image", *mask_keys] if image else list(mask_keys)
    steps = []
    if image:
        steps += [
            Lambdad("image", hu_to_unit),
            SpatialPadd("image", roi_size, mode="constant", value=-1.0),  # -1 is air after the window
        ]
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
    else:
        # Without an image, one mask alone can be put through the inverse (a generated volume's way back).
        steps.append(CenterSpatialCropd(keys, roi_size=roi_size, allow_missing_keys=not image))
    return Compose(steps)


def prepare(
    image: Volume,
    masks: dict[str, Volume] | None = None,
    roi_size: Sequence[int] = (512, 512, 256),
    train: bool = False,
    seed: int | None = None,
) -> dict[str, torch.Tensor | np.ndarray]:
    """Preprocess one image (HU) and its masks into (1, *roi_size) float tensors and the crop's affine.

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
    _reference: MetaTensor  # the first mask after preprocessing: carries the operations to undo
    _transform: Compose

    def restore(self, volume: torch.Tensor) -> torch.Tensor:
        """A generated (*roi_size) volume in [-1, 1] -> the masks' (X, Y, Z) grid: the pad and crop of
        preprocessing undone; voxels outside the model's field of view are air (-1)."""
        # MONAI's inverse pads with 0; shifting air to 0 first makes that padding air.
        shifted = MetaTensor(volume[None].float() + 1.0, affine=self._reference.affine)
        shifted.applied_operations = [dict(op) for op in self._reference.applied_operations]
        key = self._transform.transforms[0].keys[0]
        return self._transform.inverse({key: shifted})[key].as_tensor()[0] - 1.0


def prepare_condition(masks: dict[str, Volume], roi_size: Sequence[int]) -> PreparedCondition:
    """Masks (one label map per condition key, all on one grid) padded and centre-cropped to
    ``roi_size`` exactly as `voldit encode` prepares them for training."""
    if not masks:
        raise ValueError("no masks given")
    keys = list(masks)
    data = {
        key: MetaTensor(
            torch.from_numpy(mask.array[None].astype(np.float32)), affine=torch.from_numpy(mask.affine)
        )
        for key, mask in masks.items()
    }
    transform = preprocessing(roi_size, train=False, mask_keys=keys, image=False)
    out = transform(data)
    return PreparedCondition(
        condition=torch.cat([out[key].as_tensor().float() for key in keys]),
        affine=out[keys[0]].affine.numpy().astype(np.float64),
        source_affine=np.asarray(masks[keys[0]].affine, dtype=np.float64),
        _reference=out[keys[0]],
        _transform=transform,
    )
