"""The three stages' training steps: VQ-GAN (generator + discriminator), VolDiT, and TGCA.

A stage owns its networks, optimisers and EMA; the loop in ``loop.py`` calls ``train_step`` per batch,
``validate`` on a schedule, and ``checkpoint`` / ``restore`` for its state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from voldit import precision
from voldit.builders import (
    build_dit,
    build_schedule,
    build_tgca,
    build_vqgan,
    build_vqgan_discriminator,
    describe,
    latent_shape,
)
from voldit.checkpoint import Checkpoint
from voldit.config import section_dict
from voldit.diffusion import diffusion_loss
from voldit.models.dit import compile_blocks
from voldit.models.ema import EMA
from voldit.models.vqgan import VQGANLoss, init_codebook
from voldit.training.context import VAL_ROW, RunContext, TrainingError


def _wrap(model: nn.Module, ctx: RunContext) -> nn.Module:
    if ctx.world_size == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _adamw(params, lr: float, cfg: DictConfig) -> torch.optim.AdamW:
    # Fused or for-each: the same update to float32 rounding (torch has fused kernels for CPU and GPU).
    fused = True if cfg.optim.fused else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay, fused=fused)


def compiles(cfg: DictConfig, device: torch.device) -> bool:
    """``training.compile``, or where it is null whether the blocks train on a GPU."""
    return device.type == "cuda" if cfg.training.compile is None else bool(cfg.training.compile)


class _Precision:
    """Autocast and (for fp16) loss scaling on GPU; plain fp32 on CPU."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode if device.type == "cuda" else "no"
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.mode == "fp16")

    def autocast(self):
        return precision.autocast(self.mode, self.device)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, clip: float) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()


def training_state(items: dict, generator: torch.Generator) -> dict:
    """The checkpoint's training state: each item's state dict by name (optimisers, schedules, scalers), and
    the random number generators, so a resumed run draws what the uninterrupted one would have."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "generator": generator.get_state()}
    return {**{name: item.state_dict() for name, item in items.items()}, "rng": rng}


def restore_training_state(state: dict, items: dict, generator: torch.Generator) -> None:
    for name, item in items.items():
        item.load_state_dict(state[name])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(tuple(state["rng"]["numpy"]))
    generator.set_state(state["rng"]["generator"])


class DiffusionStage:
    """VolDiT (``stage='dit'``) or TGCA on a frozen VolDiT (``stage='tgca'``), trained on scaled latents.

    ``encoder`` (a frozen VQ-GAN) encodes image batches online when the data holds images, not latents.
    """

    def __init__(
        self,
        cfg: DictConfig,
        ctx: RunContext,
        scale_factor: float,
        base_state: dict[str, torch.Tensor] | None = None,
        encoder: nn.Module | None = None,
        provenance: dict | None = None,
    ) -> None:
        self.cfg, self.ctx, self.scale_factor = cfg, ctx, float(scale_factor)
        self.provenance = dict(provenance or {})
        self.stage = "tgca" if cfg.tgca is not None else "dit"
        torch.manual_seed(cfg.training.seed)  # identical initial weights on every worker
        if self.stage == "tgca":
            if base_state is None:
                raise TrainingError("TGCA training needs the frozen VolDiT's weights (a dit checkpoint)")
            base = build_dit(cfg)
            base.load_state_dict(base_state, strict=True)
            self.model = build_tgca(cfg, base)
            self.condition_keys = list(cfg.tgca.condition_keys)
        else:
            self.model = build_dit(cfg)
            self.condition_keys = []
        self.model.to(ctx.device)
        self.encoder = encoder.to(ctx.device).eval().requires_grad_(False) if encoder is not None else None
        if compiles(cfg, ctx.device):
            compile_blocks(self.model)  # per block: seconds to compile, as fast as a whole-model graph
        self.net = _wrap(self.model, ctx)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _adamw(self.params, cfg.optim.lr, cfg)
        self.lr_schedule = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.optim.lr_gamma)
        self.ema = EMA(self.model, cfg.training.ema_decay) if cfg.training.use_ema else None
        self.precision = _Precision(cfg.training.mixed_precision, ctx.device)
        self.schedule = build_schedule(cfg)
        self.generator = torch.Generator(ctx.device).manual_seed(cfg.training.seed * 1000 + ctx.rank)
        p = cfg.dit.params
        self.expected = (p.in_channels, *p.input_size)
        self.tokens = self.model.base_model.num_tokens if self.stage == "tgca" else self.model.num_tokens

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "latent" in batch:
            # A fresh tensor: arrow-backed batches have arbitrary alignment, which makes CPU kernels pick
            # different summation orders from run to run (results then differ in the last bits).
            x0 = batch["latent"].to(self.ctx.device, torch.float32, copy=True)
        elif self.encoder is not None:
            with torch.no_grad():
                x0 = self.encoder.encode_stage_2_inputs(batch["image"].to(self.ctx.device, torch.float32))
        else:
            raise TrainingError("the batch holds neither latents nor images with a VQ-GAN to encode them")
        if tuple(x0.shape[1:]) != self.expected:
            raise TrainingError(
                f"latents of shape {list(x0.shape[1:])} do not match the config's dit.params "
                f"(in_channels, input_size) = {list(self.expected)}; encode with the matching VQ-GAN and "
                "roi_size, or set dit.params.input_size to the latent size"
            )
        cond = {}
        if self.condition_keys:
            condition = torch.cat(
                [batch[k].to(self.ctx.device, torch.float32) for k in self.condition_keys], 1
            )
            if condition.shape[1] != self.cfg.tgca.params.condition_channels:
                raise TrainingError(
                    f"the condition keys {self.condition_keys} stack to {condition.shape[1]} channels, "
                    f"tgca.params.condition_channels is {self.cfg.tgca.params.condition_channels}"
                )
            cond["condition"] = condition
        return x0 * self.scale_factor, cond

    def train_mode(self) -> None:
        self.model.train()

    def train_step(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        x0, cond = self._inputs(batch)
        with self.precision.autocast():
            loss = diffusion_loss(self.net, self.schedule, x0, self.generator, **cond)
        self.precision.step(loss, self.optimizer, self.params, self.cfg.training.grad_clip)
        if self.ema is not None:
            self.ema.update()
        return {"loss": loss.detach(), "samples": torch.tensor(float(x0.shape[0]))}

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        params = dict(self.model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.ema.shadow}
        with torch.no_grad():
            for n, value in self.ema.shadow.items():
                params[n].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)

    @torch.no_grad()
    def validate(self, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-sample losses, number of samples) on this worker's share, with EMA weights and each
        row's own noise (seeded by its VAL_ROW position; without it, by its place in ``batches``), so a
        validation loss is the same every epoch and whatever the number of workers."""
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        with self._ema_weights():
            for batch in batches:
                x0, cond = self._inputs(batch)
                rows = batch.get(VAL_ROW, torch.arange(int(count), int(count) + x0.shape[0]))
                generators = [
                    torch.Generator(self.ctx.device).manual_seed(self.cfg.training.seed * 2**32 + int(row))
                    for row in rows
                ]
                with self.precision.autocast():
                    loss = diffusion_loss(self.model, self.schedule, x0, generators, **cond)
                total += loss.double().cpu() * x0.shape[0]
                count += x0.shape[0]
        return total, count

    def end_epoch(self) -> None:
        self.lr_schedule.step()

    def training_flops(self) -> int:
        """Forward and backward FLOPs of one training sample (counted on meta, for the MFU)."""
        return describe(self.cfg)["training_flops"]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def checkpoint(self) -> dict[str, Any]:
        """Keyword arguments for ``save_checkpoint``: weights, EMA, training state, metadata."""
        return {
            "stage": self.stage,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "training_state": training_state(self._resumable(), self.generator),
            "meta": {
                "scale_factor": self.scale_factor,
                "latent_shape": list(self.expected),
                "tokens": self.tokens,
                **self.provenance,
            },
        }

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.weights("model"), strict=True)
        if self.ema is not None and ckpt.has("ema"):
            self.ema.load_state_dict(ckpt.weights("ema"))
        restore_training_state(ckpt.training_state(), self._resumable(), self.generator)

    def _resumable(self) -> dict:
        """What a resume restores besides the weights, by its name in the checkpoint's training state."""
        return {"optimizer": self.optimizer, "lr_schedule": self.lr_schedule, "scaler": self.precision.scaler}


class VQGANStage:
    """The VQ-GAN: generator (VQVAE) and PatchGAN discriminator with their own optimisers; the
    adversarial terms switch on after ``stage1.adv_warmup_epochs``."""

    stage = "vqgan"
    tokens = 0

    def training_flops(self) -> None:
        return None  # generator, discriminator and losses: no single model FLOP count to quote

    def __init__(self, cfg: DictConfig, ctx: RunContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.training.seed)
        self.model = build_vqgan(cfg).to(ctx.device)
        disc = build_vqgan_discriminator(cfg)
        if ctx.world_size > 1 and ctx.device.type == "cuda":  # torch's SyncBatchNorm is GPU-only
            disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
        self.discriminator = disc.to(ctx.device)
        self.net, self.disc_net = _wrap(self.model, ctx), _wrap(self.discriminator, ctx)
        s1 = cfg.stage1
        perceptual = (
            section_dict(cfg.perceptual_network.params) if cfg.perceptual_network is not None else None
        )
        self.loss = VQGANLoss(s1.perceptual_weight, s1.adv_weight, s1.jukebox_weight, perceptual).to(
            ctx.device
        )
        self.g_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = _adamw(self.g_params, s1.base_lr, cfg)
        self.opt_d = _adamw(self.discriminator.parameters(), s1.disc_lr, cfg)
        self.lr_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, gamma=cfg.optim.lr_gamma)
        self.lr_d = torch.optim.lr_scheduler.ExponentialLR(self.opt_d, gamma=cfg.optim.lr_gamma)
        self.precision = _Precision(cfg.training.mixed_precision, ctx.device)
        self.precision_d = _Precision(cfg.training.mixed_precision, ctx.device)
        self.generator = torch.Generator(ctx.device).manual_seed(cfg.training.seed * 1000 + ctx.rank)
        self.codebook_ready = False  # set from the first batch, or by restore()

    def _init_codebook(self, images: torch.Tensor) -> None:
        init_codebook(self.model, images, self.generator)
        if self.ctx.world_size > 1 and dist.is_initialized():  # one codebook for every worker: rank 0's
            quantizer = self.model.quantizer.quantizer
            for tensor in (quantizer.embedding.weight.data, quantizer.ema_w, quantizer.ema_cluster_size):
                dist.broadcast(tensor, src=0)
        self.codebook_ready = True

    def train_mode(self) -> None:
        self.model.train()
        self.discriminator.train()

    def train_step(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.ctx.device, torch.float32, copy=True)
        if not self.codebook_ready:
            self._init_codebook(images)
        adversarial = epoch >= self.cfg.stage1.adv_warmup_epochs
        with self.precision.autocast():
            recon, q_loss = self.net(images)
            g_loss, parts = self.loss.generator(images, recon, q_loss, self.disc_net, adversarial)
        self.precision.step(g_loss, self.opt_g, self.g_params, self.cfg.training.grad_clip)
        out = {"loss": g_loss.detach(), "samples": torch.tensor(float(images.shape[0]))}
        out.update({k: v.detach() for k, v in parts.items()})
        if adversarial and self.cfg.stage1.adv_weight > 0:
            with self.precision_d.autocast():
                d_loss = self.loss.discriminator(self.disc_net, images, recon)
            self.precision_d.step(
                d_loss, self.opt_d, list(self.discriminator.parameters()), self.cfg.training.grad_clip
            )
            out["d_loss"] = d_loss.detach()
        return out

    @torch.no_grad()
    def validate(self, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of per-sample L1 reconstruction errors, samples) on this worker's shard."""
        self.model.eval()
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for batch in batches:
            images = batch["image"].to(self.ctx.device, torch.float32)
            recon, _ = self.model(images)
            total += (recon.float() - images).abs().flatten(1).mean(1).double().sum().cpu()
            count += images.shape[0]
        return total, count

    def end_epoch(self) -> None:
        self.lr_g.step()
        if self.opt_d.state:  # the discriminator's schedule starts with its first step, after the warm-up
            self.lr_d.step()

    @property
    def lr(self) -> float:
        return self.opt_g.param_groups[0]["lr"]

    def checkpoint(self) -> dict[str, Any]:
        return {
            "stage": "vqgan",
            "model": self.model.state_dict(),
            "ema": None,
            "networks": {"discriminator": self.discriminator.state_dict()},
            "training_state": training_state(self._resumable(), self.generator),
            "meta": {"latent_shape": latent_shape(self.cfg)},
        }

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.weights("model"), strict=True)
        self.codebook_ready = True
        self.discriminator.load_state_dict(ckpt.weights("discriminator"), strict=True)
        restore_training_state(ckpt.training_state(), self._resumable(), self.generator)

    def _resumable(self) -> dict:
        """What a resume restores besides the weights, by its name in the checkpoint's training state."""
        return {
            "opt_g": self.opt_g,
            "opt_d": self.opt_d,
            "lr_g": self.lr_g,
            "lr_d": self.lr_d,
            "scaler_g": self.precision.scaler,
            "scaler_d": self.precision_d.scaler,
        }
