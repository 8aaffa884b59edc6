"""DDPM and DDIM samplers and classifier-free guidance over any ``denoise(x, t, **cond)`` callable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from voldit.diffusion.schedule import NoiseSchedule

Denoise = Callable[..., torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator]
SAMPLERS = ("ddpm", "ddim")


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype):
    """Standard normal noise drawn on the generator's own device, then moved to ``device``.

    A CPU generator gives the same numbers on every machine; a CUDA generator avoids the copy. With one
    generator the whole batch is drawn at once; with one generator per sample each sample's noise
    depends only on its own generator, so a sample does not change with its batch-mates.
    """
    if isinstance(generator, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator])
    if noise.device.type == "cpu" and torch.device(device).type == "cuda":
        # From pinned memory the copy is queued behind the device's work instead of waiting for it, so
        # the host draws the next step's noise while the device still denoises.
        noise = noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device=device, dtype=dtype)


def classifier_free(
    denoise: Denoise, guidance_scale: float, unconditional: dict[str, torch.Tensor] | None = None
) -> Denoise:
    """Wrap a conditional denoiser with classifier-free guidance: u + s (c - u).

    ``u`` is the prediction with the conditioning kwargs replaced by ``unconditional`` (default: zeros of
    the same shape, a dropped condition; a batch of one is shared by every sample). Scale 1.0 returns the
    plain conditional denoiser (one pass); otherwise both passes run as one batch.
    """
    if guidance_scale == 1.0:
        return denoise

    def guided(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        null = (
            unconditional if unconditional is not None else {k: torch.zeros_like(v) for k, v in cond.items()}
        )
        both = denoise(
            torch.cat([x, x]),
            torch.cat([t, t]),
            **{k: torch.cat([v, null[k].expand_as(v)]) for k, v in cond.items()},
        )
        conditional, uncond = both.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    return guided


@torch.no_grad()
def sample(
    denoise: Denoise,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    generator: Generators,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    **cond: torch.Tensor,
) -> torch.Tensor:
    """Draw latents (B, C, D, H, W) by ancestral DDPM or DDIM (``eta`` = 0 deterministic) sampling.

    ``steps`` defaults to the schedule's T; fewer steps use evenly spaced timesteps. All randomness comes
    from ``generator`` (one, or one per sample).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    timesteps = schedule.inference_timesteps(steps or schedule.num_train_timesteps)
    x = randn(shape, generator, device, dtype)
    for i, t in enumerate(tqdm(timesteps, desc=sampler, disable=not progress, leave=False)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        out = denoise(x, t_batch, **cond).to(dtype)
        x0, eps = schedule.split_prediction(out, x, t_batch)
        abar_t = schedule.abar(t_batch, x)
        abar_prev = (
            schedule.abar(t_batch.new_full((shape[0],), t_prev), x)
            if t_prev >= 0
            else torch.ones_like(abar_t)
        )
        if sampler == "ddpm":
            x = _ddpm_step(x, x0, abar_t, abar_prev, generator, t_prev >= 0)
        else:
            x = _ddim_step(x0, eps, abar_t, abar_prev, eta, generator)
    return x


def _ddpm_step(x_t, x0, abar_t, abar_prev, generator, add_noise: bool):
    # Posterior q(x_prev | x_t, x_0) of the (possibly respaced) chain, with beta = 1 - abar_t / abar_prev.
    beta = 1 - abar_t / abar_prev
    mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x_t) / (1 - abar_t)
    if not add_noise:
        return mean
    variance = ((1 - abar_prev) / (1 - abar_t) * beta).clamp(min=1e-20)
    return mean + variance.sqrt() * randn(x_t.shape, generator, x_t.device, x_t.dtype)


def _ddim_step(x0, eps, abar_t, abar_prev, eta: float, generator):
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x
