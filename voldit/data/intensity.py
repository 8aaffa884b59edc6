"""The fixed CT intensity window: HU [-1000, 1000] <-> [-1, 1], and its exact inverse, side by side."""

from __future__ import annotations

import numpy as np
import torch

HU_MIN = -1000.0
HU_MAX = 1000.0

Array = np.ndarray | torch.Tensor


def hu_to_unit(hu: Array) -> Array:
    """Clip Hounsfield units to [HU_MIN, HU_MAX] and map linearly to [-1, 1] (float32)."""
    if isinstance(hu, torch.Tensor):
        hu = hu.float().clamp(HU_MIN, HU_MAX)
    else:
        hu = np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MAX)
    return (hu - HU_MIN) / (HU_MAX - HU_MIN) * 2.0 - 1.0


def unit_to_hu(x: Array) -> Array:
    """Inverse of ``hu_to_unit`` on [-1, 1]; values outside are clipped first, so the result stays in range."""
    # The clipped copy is the only new array: the same arithmetic then runs in place (a 512x512x256
    # volume is 0.5 GB of float32, and each temporary costs as much as the arithmetic).
    if isinstance(x, torch.Tensor):
        x = x.float().clamp(-1.0, 1.0)
        return x.add_(1.0).div_(2.0).mul_(HU_MAX - HU_MIN).add_(HU_MIN)
    x = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)
    x += 1.0
    x /= 2.0
    x *= HU_MAX - HU_MIN
    x += HU_MIN
    return x


def unit_to_hu_int16(x: Array) -> np.ndarray:
    """``unit_to_hu`` rounded to the int16 voxels CT is stored in."""
    hu = unit_to_hu(x)
    if isinstance(hu, torch.Tensor):  # torch rounds half to even like np.rint, on all cores (or the GPU)
        return hu.round_().to(torch.int16).cpu().numpy()
    return np.rint(hu).astype(np.int16)


def _bin_count(bin_width: float) -> int:
    """Bins of ``bin_width`` HU over the window; the width must divide the window and HU_MIN, so that
    every edge is a whole multiple of it (which `hu_bins` relies on)."""
    if (HU_MAX - HU_MIN) % bin_width or HU_MIN % bin_width:
        raise ValueError(f"a bin width of {bin_width} HU does not divide the window [{HU_MIN}, {HU_MAX}]")
    return round((HU_MAX - HU_MIN) / bin_width)


def hu_edges(bin_width: float) -> np.ndarray:
    """Histogram edges over the window, HU_MIN to HU_MAX every ``bin_width`` HU: (bins + 1,)."""
    return HU_MIN + bin_width * np.arange(_bin_count(bin_width) + 1)


def hu_bins(hu: np.ndarray, bin_width: float) -> np.ndarray:
    """Each voxel's bin among ``hu_edges(bin_width)``, as np.histogram places it, with values outside the
    window in the end bins: flat int64."""
    # floor(hu / w) is exact in floating point where floor((hu - HU_MIN) / w) rounds near the edges.
    index = np.floor_divide(np.asarray(hu).ravel(), bin_width).astype(np.int64)
    index -= int(HU_MIN // bin_width)
    return np.clip(index, 0, _bin_count(bin_width) - 1, out=index)


def hu_counts(hu: np.ndarray, bin_width: float) -> np.ndarray:
    """Voxels per bin of ``hu_edges(bin_width)``, values outside the window counted in the end bins:
    (bins,) int64."""
    return np.bincount(hu_bins(hu, bin_width), minlength=_bin_count(bin_width))
