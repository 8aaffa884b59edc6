"""NIfTI volumes in and out: decode from bytes (as Ray Data reads them) or paths, validate, write atomically."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip  # gzip with Intel's ISA-L: ~10x faster than zlib at level 1, same format

from voldit import storage
from voldit.errors import VolditError

_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = 32  # voxels per block edge in `relayout`


class VolumeError(VolditError, ValueError):
    """A file that is not a usable 3D volume; the message is the reason recorded for its row."""


@dataclass
class Volume:
    """A 3D array in its stored voxel order, with the voxel-to-world affine (4 x 4) and spacing (mm)."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def decode_volume(data: bytes, name: str = "<bytes>", dtype=np.float32) -> Volume:
    """Decode NIfTI bytes (plain or gzip) into a validated 3D volume; ``dtype=None`` keeps the stored
    type (with scaling applied, as nibabel does).

    Raises VolumeError for corrupt or truncated files, dimensionality other than 3 (a trailing axis
    of length 1 is squeezed), and non-finite voxels.
    """
    try:
        if data[:2] == _GZIP_MAGIC:
            data = igzip.decompress(data)
        image = nib.Nifti1Image.from_bytes(data)
        array = np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # nibabel and gzip raise many kinds for corrupt or truncated data
        raise VolumeError(f"{name}: not a readable NIfTI file ({type(error).__name__}: {error})") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{name}: expected a 3D volume, got shape {tuple(array.shape)}")
    array = relayout(array, "C")  # NIfTI stores Fortran order; torch and MONAI run far faster on C order
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise VolumeError(f"{name}: contains NaN or infinite voxels")
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64))


def relayout(array: np.ndarray, order: str) -> np.ndarray:
    """``array`` laid out in C or Fortran (``"F"``) memory order: the same shape and values, copied
    only when needed. A 3D volume is copied in blocks that fit the cache: numpy's own transposing copy
    strides through memory and takes 4-5x longer at 512x512x256."""
    if array.flags.c_contiguous if order == "C" else array.flags.f_contiguous:
        return array
    if array.ndim != 3:
        return np.asarray(array, order=order)
    out = np.empty(array.shape, array.dtype, order=order)
    for i in range(0, array.shape[0], _BLOCK):
        for k in range(0, array.shape[2], _BLOCK):
            out[i : i + _BLOCK, :, k : k + _BLOCK] = array[i : i + _BLOCK, :, k : k + _BLOCK]
    return out


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes from a local path or any fsspec URL (``s3://`` through s3fs, with credentials and
    endpoint from the standard AWS environment variables)."""
    return storage.read_bytes(path)


def read_volume(path: str | Path, dtype=np.float32) -> Volume:
    try:
        data = read_bytes(path)
    except (OSError, ValueError) as error:
        raise VolumeError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    return decode_volume(data, str(path), dtype)


def write_volume(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a NIfTI file atomically: a temporary name in the same folder, renamed when complete. A
    ``.gz`` name is gzip-compressed at level 1 (nibabel's default level), without a timestamp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(relayout(np.asarray(array), "F"), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    data = image.to_bytes()  # the single-file .nii layout: header, then voxels
    if path.name.endswith(".gz"):
        data = igzip.compress(data, compresslevel=1, mtime=0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def label_values(labels: np.ndarray) -> np.ndarray:
    """The distinct values of an integer label map, ascending: counted (one pass) for the usual small
    non-negative labels, sorted otherwise."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= 1 << 16:
        return np.unique(labels)
    flat, counts = labels.ravel(order="K"), np.zeros(high + 1, np.int64)  # K: never a transposing copy
    for start in range(0, flat.size, 1 << 22):  # bincount widens to int64: a chunk at a time stays small
        counts += np.bincount(flat[start : start + (1 << 22)], minlength=high + 1)
    return np.flatnonzero(counts)


def as_labels(array: np.ndarray) -> np.ndarray | None:
    """A label map as integers: the array itself when stored as integers, else its values rounded,
    or None when a voxel is not a whole number (or beyond int32)."""
    if array.dtype.kind in "iub":
        return array
    labels = np.rint(array)
    if not np.array_equal(labels, array) or (labels.size and np.abs(labels).max() >= 2**31):
        return None
    return labels.astype(np.int32)


def mask_labels(mask: Volume, name: str) -> np.ndarray:
    """A mask's voxels as integer labels (`as_labels`); VolumeError naming ``name`` (its key and file)
    when one is not a whole number, since a label map was expected."""
    labels = as_labels(mask.array)
    if labels is None:
        raise VolumeError(f"{name}: not a label map (non-integer values)")
    return labels


def check_same_grid(image: Volume, mask: Volume, name: str, atol: float = 1e-3) -> None:
    """A mask must share its image's voxel grid: the same shape and (to atol mm) the same affine."""
    if image.array.shape != mask.array.shape:
        raise VolumeError(
            f"{name}: mask shape {mask.array.shape} differs from image shape {image.array.shape}"
        )
    if not np.allclose(image.affine, mask.affine, atol=atol):
        raise VolumeError(
            f"{name}: mask affine differs from the image's (different voxel grid or orientation)"
        )
