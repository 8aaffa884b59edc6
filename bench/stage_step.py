"""The platform's own training step (the loop and stage that `voldit train` runs), timed without Ray.

Runs ``fit`` with an in-memory data source for ``--steps`` steps: VolDiT from a seed config, or TGCA on
it with masks at image resolution, in the config's precision (bf16 autocast on GPU), with EMA, AdamW
(``--fused``), clipping and the final checkpoint write.

    python bench/stage_step.py configs/transformer/dit_ds8_b4.yaml --batch 8 --steps 40
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, header, sync  # noqa: E402

from voldit.config import load_config  # noqa: E402
from voldit.models.dit import count_trainable  # noqa: E402
from voldit.training.context import RunContext  # noqa: E402
from voldit.training.loop import fit  # noqa: E402
from voldit.training.stages import DiffusionStage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="+")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--tgca", action="store_true", help="train TGCA on the config's VolDiT")
    parser.add_argument("--roi", type=int, nargs=3, default=[512, 512, 256], help="mask size for --tgca")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    files = list(args.config) + (["configs/tgca/tgca_ds8.yaml"] if args.tgca else [])
    overrides = [
        f"training.max_steps={args.steps}",
        "training.n_epochs=100000",
        f"training.batch_size={args.batch}",
        f"training.log_every_n_steps={max(1, args.steps // 4)}",
        f"optim.fused={args.fused}",
        f"training.roi_size=[{','.join(map(str, args.roi))}]",
    ]
    cfg = load_config(*files, overrides=overrides)
    device = torch.device(args.device)
    p = cfg.dit.params
    latents = torch.randn(args.batch, p.in_channels, *p.input_size)
    masks = (torch.rand(args.batch, 1, *args.roi) > 0.5).to(torch.int16) if args.tgca else None

    def batches(split, batch_size, epoch, shuffle):
        for _ in range(10):
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
        seconds = time.perf_counter() - start
    row = {
        "config": " + ".join(Path(f).stem for f in files),
        "stage": stage.stage,
        "batch": args.batch,
        "steps": args.steps,
        "trainable_params": count_trainable(stage.model),
        "s_per_step_incl_checkpoint": seconds / args.steps,
        "samples_per_s_incl_checkpoint": args.batch * args.steps / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    emit([row], header(device, " ".join(sys.argv)), list(row), args.out)


if __name__ == "__main__":
    main()
