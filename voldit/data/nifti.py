"""NIfTI volumes in and out: decode from bytes (as Ray Data reads them) or paths, validate, write atomically."""

from __future__ import annotations

import gzip
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from voldit import storage

_GZIP_MAGIC = b"\x1f\x8b"


class VolumeError(ValueError):
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
    """Decode NIfTI bytes (plain or gzip) into a validated 3D volume.

    Raises VolumeError for corrupt or truncated files, dimensionality other than 3 (a trailing axis
    of length 1 is squeezed), and non-finite voxels.
    """
    try:
        if data[:2] == _GZIP_MAGIC:
            data = gzip.decompress(data)
        image = nib.Nifti1Image.from_bytes(data)
        array = np.asarray(image.dataobj, dtype=dtype)
    except Exception as error:  # nibabel and gzip raise many kinds for corrupt or truncated data
        raise VolumeError(f"{name}: not a readable NIfTI file ({type(error).__name__}: {error})") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{name}: expected a 3D volume, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise VolumeError(f"{name}: contains NaN or infinite voxels")
    return Volume(array=array, affine=np.asarray(image.affine, dtype=np.float64))


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
    """Write a NIfTI file atomically: a temporary name in the same folder, renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
