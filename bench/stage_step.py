"""The platform's own training step (the loop and stage that `voldit train` runs), timed without Ray.

Runs ``fit`` with an in-memory data source: VolDiT from a seed config, or TGCA on it with masks at image
resolution, with the platform's defaults (bf16 autocast, fused AdamW and compiled blocks on a GPU; flags
override them), EMA, clipping and the final checkpoint write. The steady rate is timed between the
loop's requests for batch ``--warmup`` and batch ``--warmup + --steps`` (the loop reads each step's loss,
so every step has finished by then); the whole ``fit``, compilation and checkpoint included, beside it.

``--against`` a bench/train_step.py result on the same GPU: the ratio of this rate to that file's best
mode at the same model and batch (the goal: within 10%, i.e. >= 0.9).

    python bench/stage_step.py configs/transformer/dit_ds8_l4.yaml --batch 8 --steps 40 \\
        --against bench/results/h200-2026-12-02/train_l4.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, header, peak_flops, run_main, sync  # noqa: E402

from voldit.config import load_config  # noqa: E402
from voldit.errors import VolditError  # noqa: E402
from voldit.flops import mfu  # noqa: E402
from voldit.models.dit import count_trainable  # noqa: E402
from voldit.training.context import RunContext  # noqa: E402
from voldit.training.loop import fit  # noqa: E402
from voldit.training.stages import DiffusionStage, compiles  # noqa: E402


def best_micro(path: str, model: str, batch: int) -> dict | None:
    """The fastest non-baseline row of a train_step result at this model and batch."""
    try:
        rows = json.loads(Path(path).read_text())["results"]
    except (OSError, ValueError, KeyError) as error:
        raise VolditError(f"--against {path}: not a bench/train_step.py result ({error})") from None
    rows = [
        r
        for r in rows
        if r.get("model") == model
        and r.get("batch") == batch
        and r.get("samples_per_s")
        and not r["mode"].startswith("baseline")
    ]
    return max(rows, key=lambda r: r["samples_per_s"], default=None)


def model_of(cfg) -> str:
    """The DIT_MODELS name whose width, depth and patch the config has (train_step.py's row names)."""
    from voldit.models.dit import DIT_MODELS

    p = cfg.dit.params
    for name, kw in DIT_MODELS.items():
        if (kw["hidden_size"], kw["depth"], kw["patch_size"]) == (p.hidden_size, p.depth, p.patch_size):
            return name
    return f"custom ({p.hidden_size} wide, {p.depth} deep, patch {p.patch_size})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="+")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the timing (compilation)")
    parser.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused AdamW (default: the config's, on)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compiled blocks (default: the config's, on with a GPU)",
    )
    parser.add_argument("--tgca", action="store_true", help="train TGCA on the config's VolDiT")
    parser.add_argument("--roi", type=int, nargs=3, default=[512, 512, 256], help="mask size for --tgca")
    parser.add_argument("--against", default=None, help="a bench/train_step.py JSON from the same GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    files = list(args.config) + (["configs/tgca/tgca_ds8.yaml"] if args.tgca else [])
    total = args.warmup + args.steps + 1  # the last step is not timed: its batch request ends the window
    overrides = [
        f"training.max_steps={total}",
        "training.n_epochs=1",
        f"training.batch_size={args.batch}",
        f"training.log_every_n_steps={max(1, total // 4)}",
        f"training.roi_size=[{','.join(map(str, args.roi))}]",
    ]
    overrides += [f"optim.fused={args.fused}"] if args.fused is not None else []
    overrides += [f"training.compile={args.compile}"] if args.compile is not None else []
    cfg = load_config(*files, overrides=overrides)
    device = torch.device(args.device)
    p = cfg.dit.params
    latents = torch.randn(args.batch, p.in_channels, *p.input_size)
    masks = (torch.rand(args.batch, 1, *args.roi) > 0.5).to(torch.int16) if args.tgca else None
    model = model_of(cfg)
    # Read before the run, so a wrong --against file is refused before minutes of training.
    best = best_micro(args.against, model, args.batch) if args.against and not args.tgca else None
    requested: list[float] = []  # when the loop asked for each batch

    def batches(split, batch_size, epoch, shuffle):
        for _ in range(total + 1):
            sync(device)
            requested.append(time.perf_counter())
            yield {"latent": latents, **({"mask": masks} if masks is not None else {})}

    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(0, 1, device, batches, lambda metrics: None, Path(tmp), has_validation=False)
        base_state = None
        if args.tgca:
            from voldit.builders import build_dit

            base_state = build_dit(cfg).state_dict()
        stage = DiffusionStage(cfg, ctx, 1.0, base_state=base_state)
        start = time.perf_counter()
        fit(stage, ctx, cfg)
        sync(device)
        whole = time.perf_counter() - start
    steady = (requested[args.warmup + args.steps] - requested[args.warmup]) / args.steps
    samples_per_s = args.batch / steady
    peak = peak_flops(device)
    row = {
        "config": " + ".join(Path(f).stem for f in files),
        "model": model,
        "stage": stage.stage,
        "batch": args.batch,
        "fused_adamw": bool(cfg.optim.fused),
        "compiled_blocks": compiles(cfg, device),
        "precision": cfg.training.mixed_precision if device.type == "cuda" else "no (CPU)",
        "trainable_params": count_trainable(stage.model),
        "step_ms": 1000 * steady,
        "samples_per_s": samples_per_s,
        "mfu": mfu(samples_per_s, stage.training_flops(), peak) if peak else None,
        "whole_fit_s": whole,
        "steps": total,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if args.against and not args.tgca:  # train_step.py times VolDiT alone
        row["micro_best_mode"] = best["mode"] if best else None
        row["vs_micro_best"] = samples_per_s / best["samples_per_s"] if best else None
    emit([row], header(device, " ".join(sys.argv)), list(row), args.out)


if __name__ == "__main__":
    run_main(main)
