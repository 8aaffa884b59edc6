"""The diffusion training objective: Smooth-L1 between the network's prediction and the schedule's target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voldit.diffusion.samplers import Denoise
from voldit.diffusion.schedule import NoiseSchedule


def diffusion_loss(
    denoise: Denoise,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    **cond: torch.Tensor,
) -> torch.Tensor:
    """Mean Smooth-L1 loss at uniformly drawn timesteps for clean latents x0 (B, C, D, H, W).

    Timesteps and noise come from ``generator`` (on its device) or, without one, the global RNG of
    x0's device. The loss is taken in float32 whatever precision the network ran in.
    """
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator, device=device)
    noise = torch.randn(x0.shape, generator=generator, device=device).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    prediction = denoise(schedule.add_noise(x0, noise, t), t, **cond)
    return F.smooth_l1_loss(prediction.float(), schedule.target(x0, noise, t).float())
