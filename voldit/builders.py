"""Build each stage's networks from a validated config, or from a checkpoint directory alone."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from voldit.checkpoint import Checkpoint, CheckpointError
from voldit.config import dit_kwargs, section_dict
from voldit.diffusion.schedule import NoiseSchedule
from voldit.models.dit import DiT3D
from voldit.models.tgca import TGCA3D
from voldit.models.vqgan import build_discriminator, build_vqvae, downsample_factor


def build_vqgan(cfg: DictConfig) -> nn.Module:
    return build_vqvae(**section_dict(cfg.stage1.params))


def build_vqgan_discriminator(cfg: DictConfig) -> nn.Module:
    return build_discriminator(**section_dict(cfg.discriminator.params))


def vqgan_factor(cfg: DictConfig) -> int:
    return downsample_factor(cfg.stage1.params.downsample_parameters)


def latent_shape(cfg: DictConfig) -> list[int]:
    """Latent (C, D, H, W) of an image crop of training.roi_size under the config's VQ-GAN."""
    factor = vqgan_factor(cfg)
    return [cfg.stage1.params.embedding_dim, *(s // factor for s in cfg.training.roi_size)]


def build_dit(cfg: DictConfig) -> DiT3D:
    return DiT3D(**dit_kwargs(cfg))


def build_tgca(cfg: DictConfig, base: DiT3D | None = None) -> TGCA3D:
    return TGCA3D(base if base is not None else build_dit(cfg), **section_dict(cfg.tgca.params))


def build_schedule(cfg: DictConfig) -> NoiseSchedule:
    s = cfg.dit.scheduler
    return NoiseSchedule(s.num_train_timesteps, s.schedule, s.prediction_type)


_BUILDERS = {"vqgan": build_vqgan, "dit": build_dit, "tgca": build_tgca}


def model_from_checkpoint(ckpt: Checkpoint, use_ema: bool = True, eval_mode: bool = True) -> nn.Module:
    """Rebuild a checkpoint's model from its own config and load its weights strictly."""
    model = _BUILDERS[ckpt.stage](ckpt.config)
    try:
        model.load_state_dict(ckpt.model_state(use_ema), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match its own config: {error}") from None
    if eval_mode:
        model.eval().requires_grad_(False)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def forward_flops(model: nn.Module, *inputs_shapes: tuple[int, ...], call=None) -> int:
    """FLOPs of one forward pass, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to("meta") if next(model.parameters()).device.type != "meta" else model
    inputs = [torch.zeros(shape, device="meta") for shape in inputs_shapes]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        (call or model)(*inputs)
    return counter.get_total_flops()


def tokens(cfg: DictConfig) -> int:
    p = cfg.dit.params
    return math.prod(s // p.patch_size for s in p.input_size)
