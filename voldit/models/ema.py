"""Exponential moving average of a model's trainable parameters.

Ours rather than torch.optim.swa_utils.AveragedModel or MONAI's: those deep-copy the whole module, and a
TGCA wraps a frozen VolDiT (hundreds of millions of parameters that never change). This shadows only the
parameters that train, in float32, updated in one fused foreach lerp.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, over the parameters that require grad.

    The shadow is keyed by parameter name, so it saves and loads as a plain state dict.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone().float() for n, p in self._params.items()}

    @torch.no_grad()
    def update(self) -> None:
        names = list(self._params)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names],
            [self._params[n].detach().float() for n in names],
            1.0 - self.decay,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = set(self.shadow) - set(state), set(state) - set(self.shadow)
            raise KeyError(
                f"EMA state does not match the model: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
            )
        for name, value in state.items():
            self.shadow[name].copy_(value)
