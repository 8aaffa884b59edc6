"""CPU cost of one full-size volume on its way through synthesis, the plain way beside voldit's.

Reading a label-map mask (512x512x256 by default) and checking it, preparing the condition, and writing
the synthesised volume as int16 HU gzip NIfTI with its preview. The plain way is what nibabel and numpy
do by default (the reference's way): float32 voxels in NIfTI's Fortran order, labels found by sorting,
zlib's gzip. voldit's way: the stored type, C order, labels counted, ISA-L's gzip. One thread, as each
of the Synthesizer's I/O workers runs.

    python bench/volume_io.py --shape 512 512 256 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import emit, header  # noqa: E402
from synthesis import masks  # noqa: E402

from voldit.data.intensity import HU_MAX, HU_MIN, unit_to_hu_int16  # noqa: E402
from voldit.data.nifti import Volume, as_labels, label_values, read_volume, write_volume  # noqa: E402
from voldit.data.preprocess import prepare_condition  # noqa: E402
from voldit.previews import preview  # noqa: E402


def plain(mask_path: Path, image: torch.Tensor, roi, out: Path) -> dict:
    times = {}
    start = time.perf_counter()
    loaded = nib.load(mask_path)
    array = np.asarray(loaded.dataobj, dtype=np.float32)
    values = np.unique(array)
    assert np.array_equal(values, np.round(values))
    times["read and check mask"] = time.perf_counter() - start
    start = time.perf_counter()
    prepared = prepare_condition({"mask": Volume(array, loaded.affine)}, roi)
    times["prepare condition"] = time.perf_counter() - start
    start = time.perf_counter()
    unit = np.clip(prepared.restore(image).numpy(), -1.0, 1.0)
    hu = np.rint((unit + 1.0) / 2.0 * (HU_MAX - HU_MIN) + HU_MIN).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, prepared.source_affine), out / "plain.nii.gz")
    preview(hu, prepared.source_affine, np.rint(array).astype(np.int32))
    times["restore, HU, write, preview"] = time.perf_counter() - start
    return times


def voldit(mask_path: Path, image: torch.Tensor, roi, out: Path) -> dict:
    times = {}
    start = time.perf_counter()
    mask = read_volume(mask_path, dtype=None)
    mask.array = as_labels(mask.array)
    label_values(mask.array)
    times["read and check mask"] = time.perf_counter() - start
    start = time.perf_counter()
    prepared = prepare_condition({"mask": mask}, roi)
    times["prepare condition"] = time.perf_counter() - start
    start = time.perf_counter()
    hu = unit_to_hu_int16(prepared.restore(image))
    write_volume(out / "voldit.nii.gz", hu, prepared.source_affine)
    preview(hu, prepared.source_affine, mask.array)
    times["restore, HU, write, preview"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        [mask_path] = masks("full", 1, args.shape, tmp)
        image = torch.rand(*args.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        best = {}
        for name, fn in (("plain", plain), ("voldit", voldit)):
            runs = [fn(mask_path, image, args.shape, tmp) for _ in range(args.repeats)]
            best[name] = {stage: min(r[stage] for r in runs) for stage in runs[0]}
        plain_out, ours_out = (nib.load(tmp / f"{n}.nii.gz") for n in ("plain", "voldit"))
        assert np.array_equal(np.asarray(plain_out.dataobj), np.asarray(ours_out.dataobj))
    rows = [
        {"stage": stage, "plain_s": best["plain"][stage], "voldit_s": best["voldit"][stage]}
        for stage in best["plain"]
    ]
    rows.append(
        {
            "stage": "total",
            "plain_s": sum(r["plain_s"] for r in rows),
            "voldit_s": sum(r["voldit_s"] for r in rows),
        }
    )
    for row in rows:
        row["speedup"] = row["plain_s"] / row["voldit_s"]
    meta = {**header(torch.device("cpu"), " ".join(sys.argv)), "shape": args.shape}
    emit(rows, meta, ["stage", "plain_s", "voldit_s", "speedup"], args.out)


if __name__ == "__main__":
    main()
