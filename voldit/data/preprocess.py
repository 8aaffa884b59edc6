"""Image and mask preprocessing as the seed trains: fixed HU window, pad, crop to roi_size, light augmentation.

Built from MONAI's dictionary transforms so an image and its masks receive the same spatial operations;
images are interpolated linearly and padded with air, masks by nearest neighbour and padded with 0,
and only images get the HU window.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def preprocessing(roi_size: Sequence[int], train: bool, mask_keys: Sequence[str] = ()) -> Compose:
    """Transforms over {"image": (1, X, Y, Z), <mask key>: (1, X, Y, Z), ...} tensors with affines."""
    keys = ["image", *mask_keys]
    steps = [
        Lambdad("image", hu_to_unit),
        SpatialPadd("image", roi_size, mode="constant", value=-1.0),  # -1 is air after the window
    ]
    if mask_keys:
        steps.append(SpatialPadd(list(mask_keys), roi_size, mode="constant", value=0))
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
        steps.append(CenterSpatialCropd(keys, roi_size=roi_size))
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
