"""The diffusion training objective: Smooth-L1 between the network's prediction and the schedule's target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voldit.diffusion.samplers import Denoise, Generators
from voldit.diffusion.schedule import NoiseSchedule


def diffusion_loss(
    denoise: Denoise,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: Generators | None = None,
    **cond: torch.Tensor,
) -> torch.Tensor:
    """Mean Smooth-L1 loss at uniformly drawn timesteps for clean latents x0 (B, C, D, H, W).

    Timesteps and noise come from ``generator`` (on its device): one for the batch, or one per sample, so
    that a sample's draws depend on its own generator only, not on its batch-mates; without one, from the
    global RNG of x0's device. The loss is taken in float32 whatever precision the network ran in.
    """
    steps = schedule.num_train_timesteps
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
    else:
        if len(generator) != x0.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x0.shape[0]}")
        t = torch.cat([torch.randint(0, steps, (1,), generator=g, device=g.device) for g in generator])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=g.device) for g in generator])
    noise = noise.to(x0.device, x0.dtype)
    t = t.to(x0.device)
    prediction = denoise(schedule.add_noise(x0, noise, t), t, **cond)
    return F.smooth_l1_loss(prediction.float(), schedule.target(x0, noise, t).float())
