"""How many steps a fast sampler needs: volumes from one trained VolDiT by DDPM-300 (the paper's sampler)
and by DDIM / DPM-Solver++(2M) at fewer steps, each set scored by `voldit evaluate` against the real CTs.

The yardstick is DDPM-300 itself over three sets of seeds: the spread of its scores is what sampling
noise alone gives at this set size. Each run's score is put as a z-score against those three (how many
of their standard deviations from their mean); a fourth DDPM-300 set, ``ddpm:300:4000``, shows what a
run that is DDPM-300 gets. A fast sampler whose largest |z| over the metrics is at most 3 cannot be told
from DDPM-300 by these metrics at this set size. The solver error of each ODE sampler (DDIM, DPM-Solver++) is measured
directly as well: voxel RMSE (HU) against DDIM at 300 steps (the probability-flow ODE at the training
schedule's resolution) from the same seeds.

    voldit demo --output demo/                      # or any trained VolDiT with its VQ-GAN
    python bench/sampler_steps.py --dit demo/runs/dit/checkpoints/best --real demo/data/real.csv \\
        --n 16 --out sampler_steps.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, header, run_main  # noqa: E402

from voldit.data.nifti import read_volume  # noqa: E402
from voldit.evaluation import SET_METRICS, evaluate, load_items  # noqa: E402
from voldit.sampling import SamplingSettings, write_samples  # noqa: E402

SCORES = SET_METRICS  # lower is better for each
RUNS = ("ddpm:300:4000", "ddim:50", "ddim:20", "dpmpp:10", "dpmpp:20", "dpmpp:25", "dpmpp:50")
DDPM = ("ddpm:300:0", "ddpm:300:1000", "ddpm:300:2000")  # the paper's sampler, three sets of seeds
ODE = "ddim:300"
SEED = 3000  # the other runs' first seed: a set of their own, so none shares its noise with a DDPM set
MAX_Z = 3.0


def parse(run: str) -> tuple[str, int, int]:
    """'dpmpp:20' -> (dpmpp, 20, seeds from SEED); 'ddpm:300:1000' -> seeds from 1000."""
    sampler, steps, *seed = run.split(":")
    return sampler, int(steps), int(seed[0]) if seed else SEED


def volumes(folder: Path) -> list[np.ndarray]:
    return [read_volume(p).array.astype(np.float64) for p in sorted(folder.glob("sample_*.nii.gz"))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dit", required=True, help="a VolDiT checkpoint (its VQ-GAN from its meta)")
    parser.add_argument("--vqgan", default=None)
    parser.add_argument("--real", required=True, help="CSV with an image column: the real CTs")
    parser.add_argument("--n", type=int, default=16, help="volumes per set")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="sampler:steps[:first seed]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep", default=None, help="keep the volumes in this folder")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    # The yardstick's sets first, then the ODE reference, before the runs measured against them.
    runs = list(dict.fromkeys([*DDPM, ODE, *args.runs]))
    load_items(args.real)  # a missing or malformed real set is refused before any sampling
    rows, vqgan = [], _vqgan_of(args)
    with tempfile.TemporaryDirectory(prefix="sampler-steps-") as tmp:
        root = Path(args.keep or tmp)
        folders, ode = {}, None  # ode: the 300-step DDIM volumes, read once
        for run in runs:
            sampler, steps, seed = parse(run)
            folders[run] = root / run.replace(":", "_")
            start = time.perf_counter()
            write_samples(
                args.dit,
                folders[run],
                args.n,
                seed=seed,
                vqgan=args.vqgan,
                settings=SamplingSettings(sampler=sampler, steps=steps),
                batch_size=args.batch,
                device=args.device,
                progress=False,
            )
            seconds = (time.perf_counter() - start) / args.n
            real, _ = evaluate(folders[run], args.real, vqgan=vqgan)
            row = {
                "run": run,
                "sampler": sampler,
                "steps": steps,
                "first_seed": seed,
                "s_per_volume": seconds,
            }
            row.update({f"real_{k}": real["scores"][k] for k in SCORES})
            if run == ODE:
                ode = volumes(folders[ODE])
            elif sampler in ("ddim", "dpmpp") and seed == SEED:
                pairs = zip(volumes(folders[run]), ode, strict=True)
                row["hu_rmse_vs_ddim300"] = float(np.sqrt(np.mean([np.mean((a - b) ** 2) for a, b in pairs])))
            rows.append(row)
            print(f"{run}: {seconds:.2f} s/volume", flush=True)
    ddpm = [r for r in rows if r["run"] in DDPM]
    stats = {
        k: (
            float(np.mean([r[f"real_{k}"] for r in ddpm])),
            float(np.std([r[f"real_{k}"] for r in ddpm], ddof=1)),
        )
        for k in scored(ddpm)
    }
    for row in rows:
        z = {k: (row[f"real_{k}"] - mean) / std for k, (mean, std) in stats.items() if std > 0}
        row["max_abs_z"] = max(abs(v) for v in z.values()) if z else None
        row["worst_metric"] = max(z, key=lambda k: abs(z[k])) if z else None
    columns = [
        "run",
        "s_per_volume",
        *(f"real_{k}" for k in SCORES),
        "max_abs_z",
        "worst_metric",
        "hu_rmse_vs_ddim300",
    ]
    fast = [
        r for r in rows if r["sampler"] == "dpmpp" and r["max_abs_z"] is not None and r["max_abs_z"] <= MAX_Z
    ]
    meta = {
        "volumes_per_set": args.n,
        "ddpm300_mean_std": stats,
        "fewest_dpmpp_steps_within_3_sd": min((r["steps"] for r in fast), default=None),
    }
    device = torch.device(args.device)
    emit(rows, {**header(device, " ".join(sys.argv)), **meta}, columns, args.out)
    print(
        f"fewest DPM-Solver++ steps within {MAX_Z} DDPM-300 standard deviations on every metric: "
        f"{meta['fewest_dpmpp_steps_within_3_sd']}"
    )


def scored(rows: list[dict]) -> list[str]:
    """The set metrics every row has (the VQ-GAN distance needs the VQ-GAN)."""
    return [k for k in SCORES if all(r.get(f"real_{k}") is not None for r in rows)]


def _vqgan_of(args) -> str:
    """The VQ-GAN the checkpoint was trained with (its meta), or --vqgan: the feature distance's encoder."""
    if args.vqgan:
        return args.vqgan
    from voldit.checkpoint import load_checkpoint
    from voldit.sampling import resolve_vqgan

    return str(resolve_vqgan(load_checkpoint(args.dit, stage="dit"), None).path)


if __name__ == "__main__":
    run_main(main)
