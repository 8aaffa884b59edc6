"""Noise schedules, the forward (noising) process and conversions between prediction targets.

Stateless, with one timestep per sample (training noises a batch at different steps); MONAI's schedulers
keep the inference timesteps as state.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear_beta", "scaled_linear_beta")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


def _cosine_betas(num_steps: int, s: float = 8e-3) -> torch.Tensor:
    # Nichol & Dhariwal's cosine schedule, in float64 and clipped at 0.9999 as VolDiT was trained.
    x = torch.linspace(0, num_steps, num_steps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos((x / num_steps + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return torch.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.9999)


def _linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def _scaled_linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


_BETAS = {"cosine": _cosine_betas, "linear_beta": _linear_betas, "scaled_linear_beta": _scaled_linear_betas}


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather float64 table values at timesteps t (B,) as (B, 1, ..., 1) in like's dtype and device."""
    out = values.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """A discrete-time diffusion: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), t in [0, T).

    Tables are float64; values are cast to the data's dtype only when applied.
    """

    def __init__(
        self,
        num_train_timesteps: int = 300,
        schedule: str = "cosine",
        prediction_type: str = "v_prediction",
    ) -> None:
        if schedule not in _BETAS:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.betas = _BETAS[schedule](num_train_timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        # lambda_t = log(alpha_t / sigma_t): half the log signal-to-noise ratio, DPM-Solver's time variable.
        self.half_log_snr = 0.5 * (self.alphas_cumprod.log() - torch.log1p(-self.alphas_cumprod))
        self._tables: dict[torch.device, torch.Tensor] = {}

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t per sample, shaped and typed to broadcast against ``like``.

        The table is copied to each device once: copying it at every call would make the host wait for
        the device (a pageable host-to-device copy synchronises) at every sampling step.
        """
        table = self._tables.get(like.device)
        if table is None:
            table = self._tables[like.device] = self.alphas_cumprod.to(like.device)
        return _per_sample(table, t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        abar = self.abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        abar = self.abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict under this schedule's prediction type."""
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return noise if self.prediction_type == "epsilon" else x0

    def split_prediction(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by the network's output at x_t."""
        abar = self.abar(t, x_t)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        if self.prediction_type == "v_prediction":
            return a * x_t - s * model_output, s * x_t + a * model_output
        if self.prediction_type == "epsilon":
            return (x_t - s * model_output) / a, model_output
        return model_output, (x_t - a * model_output) / s

    def inference_timesteps(self, steps: int) -> list[int]:
        """Evenly spaced descending timesteps, ``steps`` of them (all T when steps == T)."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_train_timesteps}, got {steps}")
        ratio = self.num_train_timesteps // steps
        return [i * ratio for i in range(steps)][::-1]

    def log_snr_timesteps(self, steps: int) -> list[int]:
        """``steps`` distinct descending timesteps from ``inference_timesteps(steps)[0]`` down to 0, as evenly
        spaced in lambda_t as integer timesteps allow.

        Near t = 0 lambda changes by more per timestep than the spacing asks for; there the timesteps are
        consecutive. ``steps`` == T gives every timestep.
        """
        start = self.inference_timesteps(steps)[0]
        lam = self.half_log_snr[: start + 1]
        targets = torch.linspace(float(lam[0]), float(lam[start]), steps, dtype=torch.float64)
        chosen: list[int] = []
        for k, target in enumerate(targets):  # from t = 0 upwards
            nearest = int((lam - target).abs().argmin())
            lowest = chosen[-1] + 1 if chosen else 0
            chosen.append(min(max(nearest, lowest), start - (steps - 1 - k)))
        return chosen[::-1]
