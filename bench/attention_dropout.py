"""Attention dropout 0.1 against 0 in a short CPU overfit: one tiny VolDiT, everything else the same.

The authors' trained models had no dropout on the attention weights (their xformers call passes no
``p``), only after the projection and in the MLP. This trains the same model twice per seed, with
``dit.params.attention_dropout`` 0.1 and 0.0 and ``dit.params.dropout`` 0.1 in both, from the same
initial weights on the same fixed latents, with the same batches, timesteps and noise at every step,
and prints the two loss curves side by side. Only the attention-weight masks (and, because they use
the same RNG, the later dropout masks) differ.

Columns: the training loss (dropout on) averaged over each window of steps and over the seeds; at the
end, per seed, the mean training loss of the last window and the eval-mode loss on the training latents
at evenly spaced timesteps with fixed noise (how well each run fits its data, no dropout noise).

    python bench/attention_dropout.py                 # tiny VolDiT, latent 8x16x16x8, ~5 CPU minutes
    python bench/attention_dropout.py --steps 2000 --seeds 0 1 2 --out attention_dropout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from voldit.builders import build_dit, build_schedule
from voldit.config import load_config
from voldit.diffusion import NoiseSchedule, diffusion_loss

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = (0.1, 0.0)  # attention_dropout of the two runs


def fixed_latents(n: int, shape: list[int], seed: int) -> torch.Tensor:
    """n smooth random fields (C, D, H, W) of unit std: noise at half resolution, upsampled trilinearly,
    so neighbouring voxels are correlated as in real latents. The same for every run."""
    g = torch.Generator().manual_seed(seed)
    channels, *spatial = shape
    coarse = torch.randn(n, channels, *(max(s // 2, 1) for s in spatial), generator=g)
    x = F.interpolate(coarse, size=spatial, mode="trilinear", align_corners=False)
    return x / x.std()


@torch.no_grad()
def fit_loss(model: torch.nn.Module, schedule: NoiseSchedule, data: torch.Tensor, levels: int = 10) -> float:
    """Eval-mode Smooth-L1 loss on ``data`` at ``levels`` evenly spaced timesteps, with fixed noise."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in torch.linspace(0, schedule.num_train_timesteps - 1, levels).long():
        noise = torch.randn(data.shape, generator=g)
        steps = torch.full((len(data),), int(t))
        prediction = model(schedule.add_noise(data, noise, steps), steps)
        total += F.smooth_l1_loss(prediction, schedule.target(data, noise, steps)).item()
    return total / levels


def train(cfg, data: torch.Tensor, steps: int, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)  # initial weights, then the dropout masks
    model = build_dit(cfg).train()
    schedule = build_schedule(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    draws = torch.Generator().manual_seed(seed)  # batches, timesteps and noise: the same in both runs
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=draws)
        loss = diffusion_loss(model, schedule, data[rows], draws)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.grad_clip)
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return {"losses": losses, "fit_loss": fit_loss(model.eval(), schedule, data), "seconds": seconds}


def window_means(losses: list[float], every: int) -> list[float]:
    return [sum(losses[i : i + every]) / len(losses[i : i + every]) for i in range(0, len(losses), every)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "dit.yaml"))
    parser.add_argument("--input-size", type=int, nargs=3, default=[16, 16, 8], help="latent D H W")
    parser.add_argument("--volumes", type=int, default=8, help="fixed training latents")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="steps per printed window")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least CPU time)")
    parser.add_argument("--out", default=None, help="also write the curves as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def config(attention_dropout: float):
        overrides = [
            f"dit.params.input_size=[{','.join(map(str, args.input_size))}]",
            "dit.params.dropout=0.1",
            f"dit.params.attention_dropout={attention_dropout}",
            "dit.params.attention=math",
        ]
        return load_config(args.config, overrides=overrides)

    base = config(SETTINGS[0])
    p = base.dit.params
    data = fixed_latents(args.volumes, [p.in_channels, *args.input_size], seed=100)
    model = build_dit(base)
    print(
        f"{Path(args.config).name} with input_size {list(args.input_size)}: depth {p.depth}, hidden "
        f"{p.hidden_size}, {p.num_heads} heads, patch {p.patch_size}, {model.num_tokens} tokens, "
        f"{sum(q.numel() for q in model.parameters()):,} parameters; dropout 0.1 after projection and in MLP"
    )
    print(
        f"{args.volumes} fixed latents, batch {args.batch}, {args.steps} steps, AdamW lr {base.optim.lr} "
        f"wd {base.optim.weight_decay}, grad clip {base.training.grad_clip}, seeds {args.seeds}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    runs = {
        a: [train(config(a), data, args.steps, args.batch, seed) for seed in args.seeds] for a in SETTINGS
    }

    curves = {a: [window_means(r["losses"], args.every) for r in runs[a]] for a in SETTINGS}
    mean = {a: [sum(c) / len(c) for c in zip(*curves[a], strict=True)] for a in SETTINGS}
    print(f"\ntraining loss, mean over each window of {args.every} steps and over {len(args.seeds)} seed(s)")
    print(f"{'steps':>11}  {'attn 0.1':>9}  {'attn 0.0':>9}  {'0.0 - 0.1':>9}")
    for i, (a, b) in enumerate(zip(mean[0.1], mean[0.0], strict=True)):
        first, last = i * args.every + 1, min((i + 1) * args.every, args.steps)
        print(f"{first:>5}-{last:<5}  {a:9.4f}  {b:9.4f}  {b - a:+9.4f}")

    print("\nper seed: last-window training loss | eval-mode fit loss on the training latents | seconds")
    print(
        f"{'seed':>4}  {'train 0.1':>9}  {'train 0.0':>9}  {'fit 0.1':>9}  {'fit 0.0':>9}  {'s 0.1':>6}  {'s 0.0':>6}"
    )
    for k, seed in enumerate(args.seeds):
        r1, r0 = runs[0.1][k], runs[0.0][k]
        print(
            f"{seed:>4}  {curves[0.1][k][-1]:9.4f}  {curves[0.0][k][-1]:9.4f}  "
            f"{r1['fit_loss']:9.4f}  {r0['fit_loss']:9.4f}  {r1['seconds']:6.1f}  {r0['seconds']:6.1f}"
        )
    fit = {a: sum(r["fit_loss"] for r in runs[a]) / len(runs[a]) for a in SETTINGS}
    last = {a: mean[a][-1] for a in SETTINGS}
    print(
        f"mean  {last[0.1]:9.4f}  {last[0.0]:9.4f}  {fit[0.1]:9.4f}  {fit[0.0]:9.4f}"
        f"   (fit 0.0 vs 0.1: {100 * (fit[0.0] / fit[0.1] - 1):+.1f}%)"
    )
    if args.out:
        doc = {"args": vars(args), "runs": {str(a): runs[a] for a in SETTINGS}}
        Path(args.out).write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
