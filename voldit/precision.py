"""Precision modes and the torch.autocast each one means, shared by training and sampling."""

from __future__ import annotations

import contextlib

import torch

MODES = ("bf16", "fp16", "no")  # what a config's training.mixed_precision may say
PRECISIONS = ("auto", *MODES)  # sampling adds auto: bf16 on GPU, full precision on CPU
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(mode: str, device: torch.device) -> str:
    """``auto`` made concrete for a device; other modes stay as they are."""
    if mode == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return mode


def autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to the mode's dtype on the device's type, or nothing for ``no``."""
    mode = resolve(mode, device)
    if mode == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[mode])
