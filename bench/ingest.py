"""Ingest and encode throughput, in volumes per second.

Ingest (read + decode + HU window + crop of CT volumes): voldit's Ray Data source (paths through the
dataset, decoded in a map step) beside the same work written with MONAI's LoadImaged and a plain torch
DataLoader, on the same files and CPUs. Encode (read, prepare, VQ-GAN encode, write a latent part):
`voldit encode` (Ray Data encoder actors, a batch's files read in parallel) beside a plain loop that
reads, prepares and encodes one volume at a time, with the tiny VQ-GAN (random weights) on a CPU or the
seed's on a GPU.

    python bench/ingest.py --copies 24 --cpus 2
    python bench/ingest.py --copies 24 --cpus 2 --encode
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


def vqgan_checkpoint(folder: Path, device) -> Path:
    import torch

    from voldit.builders import build_vqgan
    from voldit.checkpoint import save_checkpoint
    from voldit.config import load_config

    name = "tiny/vqgan.yaml" if device.type == "cpu" else "stage1/vqgan_ds8.yaml"
    cfg = load_config(ROOT / "configs" / name)
    torch.manual_seed(0)
    return save_checkpoint(folder / "vqgan", config=cfg, stage="vqgan", model=build_vqgan(cfg).state_dict())


def plain_encode(frame, checkpoint: Path, device) -> float:
    """One volume at a time: read, prepare, encode, keep the latent."""
    import torch

    from voldit.builders import model_from_checkpoint
    from voldit.checkpoint import load_checkpoint
    from voldit.data.nifti import read_volume
    from voldit.data.preprocess import prepare

    ckpt = load_checkpoint(checkpoint)
    model, roi = model_from_checkpoint(ckpt).to(device), list(ckpt.config.training.roi_size)
    latents = []
    start = time.perf_counter()
    with torch.no_grad():
        for path in frame["image"]:
            image = prepare(read_volume(path), {}, roi, train=False)["image"][None].to(device)
            latents.append(model.encode_stage_2_inputs(image).float().cpu())
    return len(latents) / (time.perf_counter() - start)


def voldit_encode(frame, checkpoint: Path, folder: Path, cpus: int, batch: int, device) -> float:
    import ray

    from voldit.distributed.encode import encode

    frame.to_csv(folder / "encode.csv", index=False)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        gpus = 1.0 if device.type == "cuda" else 0.0
        start = time.perf_counter()
        summary = encode(
            folder / "encode.csv",
            checkpoint,
            folder / "latents",
            batch_size=batch,
            gpus_per_worker=gpus,
            progress=False,
        )
        assert not summary.failed, summary.failed
        return summary.encoded / (time.perf_counter() - start)
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
    parser.add_argument("--encode", action="store_true", help="also time encoding into latents")
    parser.add_argument("--batch", type=int, default=4, help="encode: rows per encoder call")
    parser.add_argument("--device", default=None, help="encode: cuda when available, else cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
        if args.encode:
            checkpoint = vqgan_checkpoint(Path(tmp), device)
            runs += (
                ("encode: plain loop, one volume at a time", lambda: plain_encode(frame, checkpoint, device)),
                (
                    f"encode: voldit encode, {args.batch} rows per call",
                    lambda: voldit_encode(frame, checkpoint, Path(tmp), args.cpus, args.batch, device),
                ),
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
    from common import header

    emit(
        rows,
        header(device if args.encode else torch.device("cpu"), " ".join(sys.argv)),
        ["pipeline", "volumes", "cpus", "volumes_per_s", "volumes_per_s_per_cpu"],
        args.out,
    )


if __name__ == "__main__":
    main()
