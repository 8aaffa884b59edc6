"""End-to-end synthesis throughput: masks in, int16 HU NIfTI volumes out (sample, decode, write).

Baseline (the reference's sample_tgca.py procedure): one mask at a time, DDPM-300, autocast in the
device's default dtype (fp16 on GPU, bf16 on CPU), plain attention math, the condition encoder run at
every step, whole-volume decode, the volume saved with nibabel (zlib's gzip). Ours: the `Synthesizer` that `voldit synthesize` runs in each Ray
actor (several masks per pass, condition features once per volume, SDPA, bf16 on GPU), with DDPM-300
and DDIM-50, previews included. `--ray` also times the whole `voldit synthesize` job (actor start-up
included). Models have random weights: throughput does not depend on what they learned.

    python bench/synthesis.py --size tiny --masks 8 --batch 8                   # CPU, real CT masks
    python bench/synthesis.py --size full --model VolDiT-L/4 --masks 16 --batch 8  # GPU, 512x512x256
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit_speedups, sync  # noqa: E402

from voldit.builders import build_tgca, build_vqgan, model_from_checkpoint  # noqa: E402
from voldit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from voldit.config import load_config  # noqa: E402
from voldit.data.intensity import unit_to_hu_int16  # noqa: E402
from voldit.data.nifti import read_volume, write_volume  # noqa: E402
from voldit.data.preprocess import prepare_condition  # noqa: E402
from voldit.diffusion import sample  # noqa: E402
from voldit.sampling import SamplingSettings  # noqa: E402
from voldit.synthesis import Synthesizer  # noqa: E402

CONFIGS = ROOT / "configs"


def checkpoints(size: str, model: str, folder: Path, attention: str) -> tuple[Path, Path]:
    """A VQ-GAN and a TGCA checkpoint of the chosen size, with random weights."""
    if size == "tiny":
        vq_cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml")
        files = [CONFIGS / "tiny" / "dit.yaml", CONFIGS / "tiny" / "tgca.yaml"]
    else:
        vq_cfg = load_config(CONFIGS / "stage1" / "vqgan_ds8.yaml")
        preset = model.split("-")[1].lower().replace("/", "")  # VolDiT-L/4 -> l4
        files = [CONFIGS / "transformer" / f"dit_ds8_{preset}.yaml", CONFIGS / "tgca" / "tgca_ds8.yaml"]
    torch.manual_seed(0)
    vq = save_checkpoint(
        folder / "vqgan", config=vq_cfg, stage="vqgan", model=build_vqgan(vq_cfg).state_dict()
    )
    cfg = load_config(*files, overrides=[f"dit.params.attention={attention}"])
    tgca = build_tgca(cfg)
    for p in tgca.parameters():  # non-zero adapter so the control path does real work
        p.data.normal_(0, 0.02)
    p = cfg.dit.params
    meta = {"scale_factor": 1.0, "latent_shape": [p.in_channels, *p.input_size], "vqgan_checkpoint": str(vq)}
    path = save_checkpoint(
        folder / f"tgca_{attention}", config=cfg, stage="tgca", model=tgca.state_dict(), meta=meta
    )
    return vq, path


def masks(size: str, count: int, roi: list[int], folder: Path) -> list[Path]:
    """Real CT organ masks (64x64x32 crops) for the tiny size; for the full size, label maps of a few
    ellipsoids at the model's field of view (uncompressed, so writing them does not dominate)."""
    if size == "tiny":
        from voldit.data.examples import fetch_examples, write_crops

        rows = write_crops(folder / "crops", fetch_examples(ROOT / ".cache" / "examples"))
        return [rows[k % len(rows)][1] for k in range(count)]
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in roi]
    paths = []
    for k in range(count):
        label = np.zeros(roi, np.uint8)
        rng = np.random.default_rng(k)
        for value in (1, 2, 3):
            centre, radii = rng.uniform(-0.4, 0.4, 3), rng.uniform(0.15, 0.4, 3)
            x, y, z = (((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True))
            label[x[:, None, None] + y[None, :, None] + z[None, None, :] < 1] = value
        paths.append(write_volume(folder / f"mask_{k:03d}.nii", label, np.diag([0.8, 0.8, 1.5, 1.0])))
    return paths


def baseline(tgca_path: Path, vq_path: Path, mask_paths, out: Path, steps: int, device) -> float:
    """The reference's loop; returns seconds for all masks."""
    ckpt = load_checkpoint(tgca_path)
    model, vq = (
        model_from_checkpoint(ckpt).to(device),
        model_from_checkpoint(load_checkpoint(vq_path)).to(device),
    )
    from voldit.builders import build_schedule

    schedule = build_schedule(ckpt.config)
    roi = list(ckpt.config.training.roi_size)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # autocast's default per device
    sync(device)
    start = time.perf_counter()
    for k, path in enumerate(mask_paths):
        prepared = prepare_condition({"mask": read_volume(path)}, roi)
        condition = prepared.condition[None].to(device)
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            z = sample(
                model,
                schedule,
                (1, *ckpt.meta["latent_shape"]),
                generator,
                "ddpm",
                steps,
                device=device,
                condition=condition,
            )
            image = vq.decode_stage_2_outputs(z).float().clamp(-1, 1)[0, 0].cpu()
        hu = unit_to_hu_int16(prepared.restore(image))
        out.mkdir(parents=True, exist_ok=True)  # written as the reference writes: nibabel, zlib's gzip
        nib.save(nib.Nifti1Image(hu, prepared.source_affine), out / f"base_{k:03d}.nii.gz")
    sync(device)
    return time.perf_counter() - start


def ours(tgca_path, mask_paths, out: Path, settings: SamplingSettings, batch: int, device) -> float:
    synth = Synthesizer(
        tgca_path, out, settings=vars_of(settings), allow_unseen_labels=True, device=str(device)
    )
    rows = [
        {"id": f"m{k:03d}", "name": f"m{k:03d}", "seed": k, "mask": str(p)} for k, p in enumerate(mask_paths)
    ]
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        result = synth({key: np.array([r[key] for r in chunk]) for key in chunk[0]})
        if any(result["error"]):
            raise RuntimeError(result["error"])
    sync(device)
    return time.perf_counter() - start


def vars_of(settings: SamplingSettings) -> dict:
    from dataclasses import asdict

    return asdict(settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--model", default="VolDiT-L/4", help="full size: the VolDiT preset")
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fast-steps", type=int, default=50)
    parser.add_argument("--baseline-masks", type=int, default=None, help="masks for the (slow) baseline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"], choices=["ddpm", "ddim"])
    parser.add_argument("--ray", action="store_true", help="also time the `voldit synthesize` Ray job")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vq, math_ckpt = checkpoints(args.size, args.model, tmp, "math")
        _, sdpa_ckpt = checkpoints(args.size, args.model, tmp, "sdpa")
        roi = list(load_checkpoint(sdpa_ckpt).config.training.roi_size)
        paths = masks(args.size, args.masks, roi, tmp / "masks")
        label = f"{'tiny' if args.size == 'tiny' else args.model} {'x'.join(map(str, roi))}"

        def record(path, batch, sampler, n, seconds):
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append(
                {
                    "path": path,
                    "model": label,
                    "batch": batch,
                    "sampler": sampler,
                    "volumes": n,
                    "s_per_volume": seconds / n,
                    "volumes_per_hour": 3600 * n / seconds,
                    "peak_gpu_gb": peak,  # sampling, decode and all: the whole path's high-water mark
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

        n_base = args.baseline_masks or args.masks
        baseline(math_ckpt, vq, paths[:1], tmp / "warm", 2, device)  # one-off costs out of the timing
        record(
            "baseline",
            1,
            f"ddpm-{args.steps}",
            n_base,
            baseline(math_ckpt, vq, paths[:n_base], tmp / "b", args.steps, device),
        )
        samplers = [("ddpm", args.steps), ("ddim", args.fast_steps)]
        samplers = [(name, steps) for name, steps in samplers if name in args.samplers]
        for sampler, steps in samplers:
            settings = SamplingSettings(sampler=sampler, steps=steps)
            ours(
                sdpa_ckpt,
                paths[: args.batch],
                tmp / "warm",
                SamplingSettings(sampler=sampler, steps=2),
                args.batch,
                device,
            )
            seconds = ours(sdpa_ckpt, paths, tmp / f"o_{sampler}", settings, args.batch, device)
            record("voldit", args.batch, f"{sampler}-{steps}", len(paths), seconds)
        if args.ray:
            import csv

            from voldit.distributed.synthesize import synthesize

            with open(tmp / "masks.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "mask"])
                writer.writerows((f"m{k:03d}", p) for k, p in enumerate(paths))
            for sampler, steps in (("ddpm", args.steps), ("ddim", args.fast_steps)):
                start = time.perf_counter()
                summary = synthesize(
                    tmp / "masks.csv",
                    sdpa_ckpt,
                    tmp / f"ray_{sampler}",
                    settings=SamplingSettings(sampler=sampler, steps=steps),
                    batch_size=args.batch,
                    gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
                    allow_unseen_labels=True,
                    progress=False,
                )
                assert not summary.failed, summary.failed
                record(
                    "voldit synthesize (Ray job)",
                    args.batch,
                    f"{sampler}-{steps}",
                    len(paths),
                    time.perf_counter() - start,
                )
    emit_speedups(
        rows,
        "volumes_per_hour",
        device,
        ["path", "model", "batch", "sampler", "volumes", "s_per_volume", "volumes_per_hour", "peak_gpu_gb"],
        args.out,
    )


if __name__ == "__main__":
    main()
