"""End-to-end synthesis throughput: gzipped label masks in, int16 HU NIfTI out (sample, decode, write).

Baseline (``baseline``, the authors' sample_tgca.py procedure): one mask at a time, DDPM-300, autocast
in the device's default dtype (fp16 on GPU, bf16 on CPU), the memory-efficient attention kernel their
`flash_attention: true` calls (SDPA's pinned `efficient` kernel; a CPU falls back to SDPA's others),
the condition encoder run at every step, whole-volume decode, the volume saved with nibabel (zlib's
gzip). `--baseline-math` adds ``baseline_math``: the same with plain attention math, the first GPU tables'
baseline (not the authors' kernel). Ours: the `Synthesizer` that `voldit synthesize` runs in each Ray
actor (condition features once per volume, SDPA, bf16 on GPU, previews included), DDPM-300 and DDIM-50,
at batch 1 over the baseline's masks and at `--batch` masks per pass. `--ray` also times the whole
`voldit synthesize` job.

Inputs are as users have them: gzipped label masks at their own size and spacing. Both paths bring them
onto the model's grid (reorient, resample, pad or crop, with voldit's `prepare_condition`: the same code in
both) and put each volume back on its mask's grid. The bench's checkpoints set the grid's spacing
(`training.spacing`); the seed configs leave it null, the authors having resampled their data beforehand.

- `--size full`: 512x512xN masks of three ellipsoids, N drawn in 200..300, at 0.7x0.7x1.5 mm, onto the
  seed's 512x512x256 grid at 0.7x0.7x1.25 mm RAS (resampled along z, then padded or cropped).
- `--size tiny`: the real example CT's organ masks, sections of its whole 366x303 mm axial extent (64
  slices, stored RAS at 3 mm, LPS at 3 mm and RAS at 3x3x6 mm in turn) onto a 64x64x32 grid at 3 mm RAS.

Each path gives a ``whole job`` row (masks in, NIfTI out) and a ``denoising`` row (the sampling loop alone,
condition encoder included). ``speedup`` compares a row with the baseline's row of the same part; rows at
another batch than the baseline's say so. Models have random weights: throughput does not depend on what
they learned.

    python bench/synthesis.py --size tiny --masks 8 --batch 8                   # CPU, real CT masks
    python bench/synthesis.py --size full --model VolDiT-L/4 --masks 16 --batch 8  # GPU, 512x512xN masks
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import emit_speedups, sync  # noqa: E402

from voldit.builders import build_schedule, build_tgca, build_vqgan, model_from_checkpoint  # noqa: E402
from voldit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from voldit.config import load_config  # noqa: E402
from voldit.data.intensity import unit_to_hu_int16  # noqa: E402
from voldit.data.nifti import read_volume, write_volume  # noqa: E402
from voldit.data.preprocess import Grid, prepare_condition  # noqa: E402
from voldit.diffusion import sample  # noqa: E402
from voldit.sampling import SamplingSettings  # noqa: E402
from voldit.synthesis import Synthesizer  # noqa: E402

CONFIGS = ROOT / "configs"
# The model's grid per size (mm per axis, RAS); the masks' own spacing is in `masks`.
GRID_SPACING = {"tiny": [3.0, 3.0, 3.0], "full": [0.7, 0.7, 1.25]}
FULL_MASK_SPACING = (0.7, 0.7, 1.5)
FULL_MASK_SLICES = (200, 300)  # N of a 512x512xN mask is drawn in this range (inclusive)
COLUMNS = "path part model attention batch sampler volumes s_per_volume volumes_per_hour peak_gpu_gb".split()


class Stopwatch:
    """Seconds spent in the calls it wraps, the device synchronised at both ends of each."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def wrap(self, fn):
        def timed_call(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds += time.perf_counter() - start

        return timed_call


def checkpoints(size: str, model: str, folder: Path, attentions: list[str]) -> tuple[Path, dict[str, Path]]:
    """A VQ-GAN and one TGCA checkpoint per attention kernel, of the chosen size, with random weights
    (the same weights in each) and the size's grid."""
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
    spacing = ",".join(map(str, GRID_SPACING[size]))
    paths = {}
    for attention in attentions:
        overrides = [
            f"dit.params.attention={attention}",
            f"training.spacing=[{spacing}]",
            "training.orientation=RAS",
        ]
        cfg = load_config(*files, overrides=overrides)
        torch.manual_seed(0)
        tgca = build_tgca(cfg)
        for p in tgca.parameters():  # non-zero adapter so the control path does real work
            p.data.normal_(0, 0.02)
        p = cfg.dit.params
        meta = {
            "scale_factor": 1.0,
            "latent_shape": [p.in_channels, *p.input_size],
            "vqgan_checkpoint": str(vq),
        }
        paths[attention] = save_checkpoint(
            folder / f"tgca_{attention}", config=cfg, stage="tgca", model=tgca.state_dict(), meta=meta
        )
    return vq, paths


def masks(size: str, count: int, folder: Path) -> list[Path]:
    """``count`` gzipped label masks at their own size and spacing (see the module's docstring)."""
    if size == "tiny":
        from voldit.data.examples import fetch_examples, write_sections

        rows = write_sections(folder, fetch_examples(ROOT / ".cache" / "examples"), count=min(count, 12))
        return [rows[k % len(rows)][1] for k in range(count)]
    paths = []
    for k in range(count):
        rng = np.random.default_rng(k)
        shape = (512, 512, int(rng.integers(FULL_MASK_SLICES[0], FULL_MASK_SLICES[1] + 1)))
        axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
        label = np.zeros(shape, np.uint8)
        for value in (1, 2, 3):
            centre, radii = rng.uniform(-0.4, 0.4, 3), rng.uniform(0.15, 0.4, 3)
            x, y, z = (((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True))
            label[x[:, None, None] + y[None, :, None] + z[None, None, :] < 1] = value
        affine = np.diag([*FULL_MASK_SPACING, 1.0])
        paths.append(write_volume(folder / f"mask_{k:03d}.nii.gz", label, affine))
    return paths


def baseline(
    tgca_path: Path, vq_path: Path, mask_paths, out: Path, steps: int, device
) -> tuple[float, float]:
    """The authors' loop, one mask at a time; returns seconds for all masks, whole job and denoising."""
    ckpt = load_checkpoint(tgca_path)
    model, vq = (
        model_from_checkpoint(ckpt).to(device),
        model_from_checkpoint(load_checkpoint(vq_path)).to(device),
    )
    schedule = build_schedule(ckpt.config)
    grid = Grid.of(ckpt.config)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16  # autocast's default per device
    denoising = Stopwatch(device)
    timed_sample = denoising.wrap(sample)
    out.mkdir(parents=True, exist_ok=True)
    sync(device)
    start = time.perf_counter()
    for k, path in enumerate(mask_paths):
        prepared = prepare_condition({"mask": read_volume(path)}, grid)  # the field of view centred
        condition = prepared.condition[None].to(device)
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            z = timed_sample(
                model,
                schedule,
                (1, *ckpt.meta["latent_shape"]),
                generator,
                "ddpm",
                steps,
                device=device,
                condition=condition,  # the condition encoder runs at every step
            )
            image = vq.decode_stage_2_outputs(z).float().clamp(-1, 1)[0, 0].cpu()
        hu = unit_to_hu_int16(prepared.restore(image))
        # written as the reference writes: nibabel, zlib's gzip
        nib.save(nib.Nifti1Image(hu, prepared.source_affine), out / f"base_{k:03d}.nii.gz")
    sync(device)
    return time.perf_counter() - start, denoising.seconds


def ours(
    tgca_path, mask_paths, out: Path, settings: SamplingSettings, batch: int, device
) -> tuple[float, float]:
    """The Synthesizer over the masks, ``batch`` per pass; returns seconds, whole job and denoising."""
    synth = Synthesizer(
        tgca_path, out, settings=asdict(settings), allow_unseen_labels=True, device=str(device)
    )
    denoising = Stopwatch(device)
    synth.pipeline.sample_latents = denoising.wrap(synth.pipeline.sample_latents)
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
    return time.perf_counter() - start, denoising.seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--model", default="VolDiT-L/4", help="full size: the VolDiT preset")
    parser.add_argument("--masks", type=int, default=8, help="masks for our batched rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fast-steps", type=int, default=50)
    parser.add_argument(
        "--baseline-masks", type=int, default=4, help="masks for the (slow) baseline and our batch-1 rows"
    )
    parser.add_argument(
        "--baseline-math", action="store_true", help="also the old math-attention baseline (not the authors')"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"], choices=["ddpm", "ddim"])
    parser.add_argument("--ray", action="store_true", help="also time the `voldit synthesize` Ray job")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baselines = {"baseline": "efficient", **({"baseline_math": "math"} if args.baseline_math else {})}
        vq, ckpts = checkpoints(args.size, args.model, tmp, [*baselines.values(), "sdpa"])
        roi = list(load_checkpoint(ckpts["sdpa"]).config.training.roi_size)
        n_base = args.baseline_masks
        paths = masks(args.size, max(args.masks, n_base), tmp / "masks")
        label = f"{'tiny' if args.size == 'tiny' else args.model} {'x'.join(map(str, roi))}"

        def record(path, attention, batch, sampler, n, seconds):
            whole, denoising = seconds
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            common = {
                "path": path,
                "model": label,
                "attention": attention,
                "batch": batch,
                "sampler": sampler,
            }
            for part, s in (("whole job", whole), ("denoising", denoising)):
                if s is None:
                    continue
                rows.append(
                    {
                        **common,
                        "part": part,
                        "volumes": n,
                        "s_per_volume": s / n,
                        "volumes_per_hour": 3600 * n / s,
                        # sampling, decode and all: the whole path's high-water mark
                        "peak_gpu_gb": peak if part == "whole job" else None,
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

        for name, attention in baselines.items():
            # one-off costs out of the timing
            baseline(ckpts[attention], vq, paths[:1], tmp / f"warm_{name}", 2, device)
            seconds = baseline(ckpts[attention], vq, paths[:n_base], tmp / name, args.steps, device)
            record(name, attention, 1, f"ddpm-{args.steps}", n_base, seconds)
        samplers = [("ddpm", args.steps), ("ddim", args.fast_steps)]
        samplers = [(name, steps) for name, steps in samplers if name in args.samplers]
        runs = [(1, paths[:n_base])] if args.batch != 1 else []
        runs.append((args.batch, paths[: args.masks]))
        for batch, chunk in runs:
            for sampler, steps in samplers:
                tag = f"{sampler}_b{batch}"
                warm = SamplingSettings(sampler=sampler, steps=2)
                ours(ckpts["sdpa"], chunk[:batch], tmp / f"warm_{tag}", warm, batch, device)
                settings = SamplingSettings(sampler=sampler, steps=steps)
                seconds = ours(ckpts["sdpa"], chunk, tmp / f"ours_{tag}", settings, batch, device)
                record("voldit", "sdpa", batch, f"{sampler}-{steps}", len(chunk), seconds)
        if args.ray:
            import csv

            from voldit.distributed.synthesize import synthesize

            with open(tmp / "masks.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "mask"])
                writer.writerows((f"m{k:03d}", p) for k, p in enumerate(paths[: args.masks]))
            for sampler, steps in samplers:
                start = time.perf_counter()
                summary = synthesize(
                    tmp / "masks.csv",
                    ckpts["sdpa"],
                    tmp / f"ray_{sampler}",
                    settings=SamplingSettings(sampler=sampler, steps=steps),
                    batch_size=args.batch,
                    gpus_per_worker=1.0 if device.type == "cuda" else 0.0,
                    allow_unseen_labels=True,
                    progress=False,
                )
                assert not summary.failed, summary.failed
                elapsed = time.perf_counter() - start
                record(
                    "voldit synthesize (Ray job)",
                    "sdpa",
                    args.batch,
                    f"{sampler}-{steps}",
                    args.masks,
                    (elapsed, None),
                )
    inputs = {
        "tiny": "example CT organ-mask sections, 366x303 mm, 64 slices: RAS 3 mm, LPS 3 mm, RAS 3x3x6 mm",
        "full": f"512x512xN ellipsoids, N in {FULL_MASK_SLICES}, {FULL_MASK_SPACING} mm",
    }[args.size]
    meta = {
        "masks": inputs,
        "grid": {"roi_size": roi, "spacing": GRID_SPACING[args.size], "orientation": "RAS"},
    }
    emit_speedups(
        rows,
        "volumes_per_hour",
        device,
        COLUMNS,
        args.out,
        same=("part",),
        meta=meta,
    )


if __name__ == "__main__":
    main()
