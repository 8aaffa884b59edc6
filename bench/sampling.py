"""Conditional sampling throughput (TGCA on VolDiT), the authors' procedure beside the fast path.

Baseline (``baseline``, the authors' procedure): one mask at a time, DDPM-300, fp16 autocast, the
memory-efficient attention kernel their `flash_attention: true` calls (SDPA's pinned `efficient` kernel
here; a CPU falls back to SDPA's others), the condition encoder run at every step. ``baseline_math``:
the same with plain attention math, the baseline the first GPU tables used (not the authors' kernel). Fast
path: bf16 autocast, SDPA, the condition encoder run once per volume (its features do not depend on t),
DDPM-300 and DDIM-50, at batch 1 (beside the baseline's batch) and at several masks per pass. ``speedup``
is against the baseline at the same batch; a row at another batch says that it is compared with the
baseline's batch 1. Figures cover denoising only (VQ-GAN decode is measured separately).

    python bench/sampling.py --model VolDiT-L/4 --roi 512 512 256 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_speedups, sync  # noqa: E402

from voldit.diffusion import NoiseSchedule, sample  # noqa: E402
from voldit.models.dit import DIT_MODELS, DiT3D  # noqa: E402
from voldit.models.tgca import TGCA3D  # noqa: E402


def build(name: str, latent, attention: str, device) -> TGCA3D:
    torch.manual_seed(0)
    model = TGCA3D(DiT3D(**DIT_MODELS[name], input_size=latent, attention=attention))
    for p in model.parameters():  # non-zero adapter so the control path does real work
        p.data.normal_(0, 0.02)
    return model.to(device).eval()


def run(model, schedule, batch, roi, latent, steps, sampler, amp, precompute, device, repeats) -> float:
    """Seconds per volume."""
    condition = (torch.rand(batch, 1, *roi, device=device) > 0.5).float()
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]

    def once():
        with torch.autocast(device.type, dtype=amp, enabled=device.type == "cuda" or amp is torch.bfloat16):
            cond = (
                {"features": model.condition_features(condition)} if precompute else {"condition": condition}
            )
            sample(model, schedule, (batch, 8, *latent), gens, sampler, steps, device=device, **cond)

    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    sync(device)
    return (time.perf_counter() - start) / repeats / batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="VolDiT-L/4", choices=list(DIT_MODELS))
    parser.add_argument("--roi", type=int, nargs=3, default=[512, 512, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="baseline and fast DDPM steps")
    parser.add_argument("--fast-steps", type=int, default=50, help="the fast path's short DDIM")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    latent = [s // 8 for s in args.roi]
    schedule = NoiseSchedule(300, "cosine", "v_prediction")
    rows = []
    plans = [
        ("baseline", "efficient", torch.float16, False, 1, "ddpm", args.steps),
        ("baseline_math", "math", torch.float16, False, 1, "ddpm", args.steps),
    ]
    for batch in sorted({1, args.batch}):
        plans += [
            ("fast", "sdpa", torch.bfloat16, True, batch, "ddpm", args.steps),
            ("fast", "sdpa", torch.bfloat16, True, batch, "ddim", args.fast_steps),
        ]
    for label, attention, amp, precompute, batch, sampler, steps in plans:
        model = build(args.model, latent, attention, device)
        with torch.no_grad():
            # warm up with a short run so the timed run excludes one-off costs
            run(model, schedule, batch, args.roi, latent, 2, sampler, amp, precompute, device, 1)
            seconds = run(
                model,
                schedule,
                batch,
                args.roi,
                latent,
                steps,
                sampler,
                amp,
                precompute,
                device,
                args.repeats,
            )
        rows.append(
            {
                "path": label,
                "model": args.model,
                "roi": "x".join(map(str, args.roi)),
                "attention": attention,
                "batch": batch,
                "sampler": f"{sampler}-{steps}",
                "s_per_volume": seconds,
                "volumes_per_hour": 3600 / seconds,
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit_speedups(
        rows,
        "volumes_per_hour",
        device,
        ["path", "model", "roi", "attention", "batch", "sampler", "s_per_volume", "volumes_per_hour"],
        args.out,
    )


if __name__ == "__main__":
    main()
