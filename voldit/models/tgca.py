"""TGCA: a timestep-gated control adapter that conditions a frozen VolDiT on masks via control tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from voldit.models.dit import DiT3D

ENCODER_CHANNELS = (8, 16, 32, 64, 128)


def _conv(in_ch: int, out_ch: int, stride: int) -> Convolution:
    return Convolution(3, in_ch, out_ch, strides=stride, kernel_size=3, padding=1, conv_only=True)


class ConditionEncoder(nn.Module):
    """Condition (B, K, X, Y, Z) at image resolution -> features (B, hidden, X/16, Y/16, Z/16).

    Each level is a 3x3x3 conv then a stride-2 conv, all SiLU; the output conv starts at zero so the
    adapter contributes nothing before training.
    """

    def __init__(
        self, in_channels: int, out_channels: int, channels: Sequence[int] = ENCODER_CHANNELS
    ) -> None:
        super().__init__()
        self.conv_in = _conv(in_channels, channels[0], 1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.extend([_conv(c_in, c_in, 1), _conv(c_in, c_out, 2)])
        self.conv_out = _conv(channels[-1], out_channels, 1)
        for p in self.conv_out.parameters():
            nn.init.zeros_(p)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(condition))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class TGCA3D(nn.Module):
    """Conditional VolDiT: ``forward(x, t, condition)`` with condition (B, K, X, Y, Z) at image resolution.

    The condition encoder's features, resized to the token grid, are scaled by a gate
    g(t) = sigmoid(Linear(t_emb)) and, times a learnable per-block scale, added to the attention input of
    each injected block.

    The base model is frozen (optionally but its last ``finetune_last_n_blocks`` blocks and final layer)
    and stays in eval mode whatever mode the wrapper is put in. Condition dropout, which makes
    classifier-free guidance possible, happens here and only here: in training mode each sample's whole
    condition is zeroed with probability ``condition_dropout_prob`` (p); of the samples that keep it, each
    channel is zeroed with probability ``channel_dropout_prob`` (q). A training sample is thus unconditional
    with probability ``unconditional_rate`` = p + (1 - p) q^K for K condition channels.
    """

    def __init__(
        self,
        base_model: DiT3D,
        condition_channels: int = 1,
        inject_layers: int | None = None,
        finetune_last_n_blocks: int = 0,
        condition_dropout_prob: float = 0.1,
        channel_dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        depth = len(base_model.blocks)
        if inject_layers is not None and not 1 <= inject_layers <= depth:
            raise ValueError(
                f"inject_layers must be null or between 1 and depth {depth}, got {inject_layers}"
            )
        if not 0 <= finetune_last_n_blocks <= depth:
            raise ValueError(f"finetune_last_n_blocks must be between 0 and depth {depth}")
        for name, value in (
            ("condition_dropout_prob", condition_dropout_prob),
            ("channel_dropout_prob", channel_dropout_prob),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.base_model = base_model
        self.inject_layers = list(range(depth - (inject_layers or depth), depth))
        self.condition_channels = condition_channels
        self.condition_dropout_prob = condition_dropout_prob
        self.channel_dropout_prob = channel_dropout_prob
        hidden = base_model.hidden_size
        self.condition_embedder = ConditionEncoder(condition_channels, hidden)
        self.time_gate = nn.Linear(hidden, 1)
        nn.init.zeros_(self.time_gate.weight)
        nn.init.zeros_(self.time_gate.bias)
        self.adapter_scales = nn.ParameterList(
            nn.Parameter(torch.full((1,), 0.1)) for _ in self.inject_layers
        )

        base_model.requires_grad_(False)
        # A plain list, so the shared modules are not registered (and saved) a second time.
        self._finetuned: list[nn.Module] = (
            [*base_model.blocks[depth - finetune_last_n_blocks :], base_model.final_layer]
            if finetune_last_n_blocks
            else []
        )
        for module in self._finetuned:
            module.requires_grad_(True)
        self.train(True)

    def train(self, mode: bool = True) -> TGCA3D:
        super().train(mode)
        self.base_model.eval()
        for module in self._finetuned:
            module.train(mode)
        return self

    def condition_features(self, condition: torch.Tensor) -> torch.Tensor:
        """Ungated control features (B, T, hidden) of a condition (B, K, X, Y, Z).

        They do not depend on the timestep, so a sampler computes them once per volume, not per step.
        """
        features = self.condition_embedder(condition.to(self.time_gate.weight.dtype))  # (B, hidden, x, y, z)
        grid = self.base_model.x_embedder.grid_size
        if tuple(features.shape[2:]) != grid:
            features = F.interpolate(features, size=grid, mode="trilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2)  # (B, T, hidden)

    @property
    def unconditional_rate(self) -> float:
        """The probability that condition dropout leaves a training sample no condition at all."""
        p, q = self.condition_dropout_prob, self.channel_dropout_prob
        return p + (1 - p) * q**self.condition_channels

    def drop_condition(
        self, condition: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training-time dropout of a condition (B, K, X, Y, Z): whole samples, then single channels."""
        b, k = condition.shape[:2]
        device = generator.device if generator is not None else condition.device
        keep = torch.rand(b, 1, generator=generator, device=device) >= self.condition_dropout_prob  # (B, 1)
        if self.channel_dropout_prob > 0:
            keep = keep & (torch.rand(b, k, generator=generator, device=device) >= self.channel_dropout_prob)
        keep = keep.to(condition.device, condition.dtype)  # (B, 1) or (B, K)
        return condition * keep.view(b, keep.shape[1], *([1] * (condition.ndim - 2)))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prediction for latents x (B, C, D, H, W) at timesteps t (B,), given the condition or its
        precomputed ``condition_features``."""
        if (condition is None) == (features is None):
            raise ValueError("pass exactly one of condition and features")
        if features is None:
            if self.training and (self.condition_dropout_prob > 0 or self.channel_dropout_prob > 0):
                condition = self.drop_condition(condition)
            features = self.condition_features(condition)
        base = self.base_model
        tokens, c = base.embed(x, t)
        control = torch.sigmoid(self.time_gate(c)).unsqueeze(1) * features.to(c.dtype)  # gate (B, 1, 1)
        controls: list[torch.Tensor | None] = [None] * len(base.blocks)
        for scale, i in zip(self.adapter_scales, self.inject_layers, strict=True):
            controls[i] = scale * control
        return base.head(base.run_blocks(tokens, c, controls), c)
