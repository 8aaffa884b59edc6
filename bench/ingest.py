"""Ingest throughput: read + decode + HU window + crop of CT volumes, in volumes per second per CPU.

voldit's Ray Data source (paths through the dataset, decoded in a map step) beside the same work
written with MONAI's LoadImaged and a plain torch DataLoader, on the same files and CPUs.

    python bench/ingest.py --copies 24 --cpus 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def voldit_ray(frame, roi, cpus, rows_per_task=1) -> float:
    import ray

    from voldit.distributed.data import volume_dataset

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        sum(1 for _ in volume_dataset(frame.head(cpus), roi, train=False).iter_rows())  # warm the workers
        start = time.perf_counter()
        n = sum(1 for _ in volume_dataset(frame, roi, train=False, rows_per_task=rows_per_task).iter_rows())
        return n / (time.perf_counter() - start)
    finally:
        ray.shutdown()


def monai_dataloader(frame, roi, cpus) -> float:
    from monai.data import DataLoader, Dataset
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        ScaleIntensityRanged,
        SpatialPadd,
    )

    transform = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            ScaleIntensityRanged("image", -1000, 1000, -1.0, 1.0, clip=True),
            SpatialPadd("image", roi, value=-1.0),
            CenterSpatialCropd("image", roi),
        ]
    )
    dataset = Dataset(frame[["image"]].to_dict("records"), transform)
    loader = DataLoader(dataset, batch_size=1, num_workers=cpus, persistent_workers=False)
    start = time.perf_counter()
    n = sum(len(batch["image"]) for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=24, help="volumes to read (copies of the example CT)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--roi", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from voldit.data.examples import fetch_examples

    source = fetch_examples(ROOT / ".cache" / "examples")["example_ct"][0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.copies):
            paths.append(Path(tmp) / f"ct_{i:03d}.nii.gz")
            shutil.copy(source, paths[-1])
        frame = pd.DataFrame({"id": [p.stem for p in paths], "image": [str(p) for p in paths]})
        rows = []
        runs = (
            ("monai LoadImaged + DataLoader", lambda: monai_dataloader(frame, args.roi, args.cpus)),
            ("voldit Ray Data, 1 row per task", lambda: voldit_ray(frame, args.roi, args.cpus)),
            ("voldit Ray Data, 4 rows per task", lambda: voldit_ray(frame, args.roi, args.cpus, 4)),
        )
        for name, fn in runs:
            rate = fn()
            rows.append(
                {
                    "pipeline": name,
                    "volumes": args.copies,
                    "cpus": args.cpus,
                    "volumes_per_s": rate,
                    "volumes_per_s_per_cpu": rate / args.cpus,
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    import torch
    from common import header

    emit(
        rows,
        header(torch.device("cpu"), " ".join(sys.argv)),
        ["pipeline", "volumes", "cpus", "volumes_per_s", "volumes_per_s_per_cpu"],
        args.out,
    )


if __name__ == "__main__":
    main()
