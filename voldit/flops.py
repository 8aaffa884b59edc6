"""Model FLOPs and the accelerators' peaks: model FLOPs utilisation (MFU) for `voldit train`, `voldit info`
and the benchmarks.

FLOPs are counted by torch's FlopCounterMode on the meta device (no memory, no compute), so they are the
model's own matrix products and convolutions: attention's softmax, norms and the optimiser are not
counted, as in the usual MFU definition (PaLM, appendix B).
"""

from __future__ import annotations

import platform

import torch
from torch import nn

# Dense bf16/fp16 tensor-core peak by the vendors' datasheets (FLOP/s); the first name contained in the
# device's name wins (the PCIe and NVL H100s are slower than the SXM). Others: `training.peak_flops`.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None off a GPU or for a GPU not in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _count(model: nn.Module, inputs_shapes, call=None, backward: bool = False) -> int:
    """FLOPs of one call of ``call`` (the model by default) on zero inputs of these shapes, on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to("meta") if next(model.parameters()).device.type != "meta" else model
    inputs = [torch.zeros(shape, device="meta") for shape in inputs_shapes]
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(backward):
        out = (call or model)(*inputs)
        if backward:
            out.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def forward_flops(model: nn.Module, *inputs_shapes: tuple[int, ...], call=None) -> int:
    """FLOPs of one forward pass, counted on the meta device."""
    return _count(model, inputs_shapes, call)


def training_flops(model: nn.Module, *inputs_shapes: tuple[int, ...]) -> int:
    """FLOPs of one forward and backward pass, counted on the meta device: about 3x the forward for a
    model trained whole, less where frozen weights need no gradient of their own (TGCA's VolDiT)."""
    return _count(model, inputs_shapes, backward=True)


def mfu(samples_per_s: float, flops_per_sample: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: the FLOP/s the samples took over the peak of every worker's device."""
    return samples_per_s * flops_per_sample / (peak * world_size)
