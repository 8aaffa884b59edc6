"""Build each stage's networks from a validated config, or from a checkpoint directory alone."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from voldit.checkpoint import Checkpoint, CheckpointError
from voldit.config import dit_kwargs, section_dict, stage_of
from voldit.diffusion.schedule import NoiseSchedule
from voldit.flops import forward_flops, training_flops
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


def tokens(cfg: DictConfig) -> int:
    p = cfg.dit.params
    return math.prod(s // p.patch_size for s in p.input_size)


def describe(cfg) -> dict:
    """Parameter counts, tokens and FLOPs of the model a config describes (built on meta): forward, and for
    VolDiT and TGCA forward and backward of one training sample."""
    stage = stage_of(cfg)
    info: dict = {"stage": stage}
    with torch.device("meta"):
        if stage == "vqgan":
            vq = build_vqgan(cfg)
            info["trainable_parameters"], info["total_parameters"] = count_parameters(vq)
            info["codebook_parameters"] = info["total_parameters"] - info["trainable_parameters"]
            if cfg.discriminator is not None:
                info["discriminator_parameters"] = count_parameters(build_vqgan_discriminator(cfg))[0]
            roi = tuple(cfg.training.roi_size)
            info["roi_size"] = list(roi)
            info["latent_shape"] = latent_shape(cfg)
            info["encode_flops"] = forward_flops(vq, (1, 1, *roi), call=vq.encode_stage_2_inputs)
            info["decode_flops"] = forward_flops(
                vq, (1, *info["latent_shape"]), call=vq.decode_stage_2_outputs
            )
            return info
        base = build_dit(cfg)
        p = cfg.dit.params
        info["tokens"] = tokens(cfg)
        info["latent_shape"] = [p.in_channels, *p.input_size]
        x_shape, t_shape = (1, p.in_channels, *p.input_size), (1,)
        if stage == "dit":
            info["trainable_parameters"], info["total_parameters"] = count_parameters(base)
            info["forward_flops"] = forward_flops(base, x_shape, t_shape)
            info["training_flops"] = training_flops(base, x_shape, t_shape)
        else:
            tgca = build_tgca(cfg, base)
            info["trainable_parameters"], info["total_parameters"] = count_parameters(tgca)
            cond_shape = (1, cfg.tgca.params.condition_channels, *cfg.training.roi_size)
            info["forward_flops"] = forward_flops(tgca, x_shape, t_shape, cond_shape)
            info["training_flops"] = training_flops(tgca, x_shape, t_shape, cond_shape)
    return info
