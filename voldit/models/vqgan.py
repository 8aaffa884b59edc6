"""Stage 1: the VQ-GAN (MONAI's EMA-codebook VQVAE and PatchDiscriminator) and its losses.

MONAI already implements the networks and losses; this module pins VolDiT's settings and composes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import JukeboxLoss, PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import VQVAE, PatchDiscriminator
from torch import nn

from voldit.errors import VolditError


def build_vqvae(
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 1,
    num_channels: Sequence[int] = (128, 256, 512),
    num_res_channels: Sequence[int] = (128, 256, 512),
    num_res_layers: int = 2,
    downsample_parameters: Sequence[Sequence[int]] = ((2, 4, 1, 1),) * 3,
    upsample_parameters: Sequence[Sequence[int]] = ((2, 4, 1, 1, 0),) * 3,
    num_embeddings: int = 4096,
    embedding_dim: int = 8,
    commitment_cost: float = 0.25,
    decay: float = 0.99,
    epsilon: float = 1e-5,
    ddp_sync: bool = True,
) -> VQVAE:
    """MONAI VQVAE with VolDiT's defaults (the seed calls ``channels`` ``num_channels``).

    ``decay`` is 0.99 here (MONAI defaults to 0.5); ``ddp_sync`` all-reduces the EMA codebook statistics
    so every DDP worker keeps the same codebook.
    """
    return VQVAE(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(num_channels),
        num_res_channels=tuple(num_res_channels),
        num_res_layers=num_res_layers,
        downsample_parameters=tuple(tuple(p) for p in downsample_parameters),
        upsample_parameters=tuple(tuple(p) for p in upsample_parameters),
        num_embeddings=num_embeddings,
        embedding_dim=embedding_dim,
        commitment_cost=commitment_cost,
        decay=decay,
        epsilon=epsilon,
        ddp_sync=ddp_sync,
    )


def downsample_factor(downsample_parameters: Sequence[Sequence[int]]) -> int:
    """How many voxels per axis one latent voxel covers (product of the strides)."""
    factor = 1
    for stride, *_ in downsample_parameters:
        factor *= stride
    return factor


def build_discriminator(
    spatial_dims: int = 3,
    num_channels: int = 64,
    num_layers_d: int = 3,
    in_channels: int = 1,
    out_channels: int = 1,
) -> PatchDiscriminator:
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        channels=num_channels,
        num_layers_d=num_layers_d,
        in_channels=in_channels,
        out_channels=out_channels,
    )


class PerceptualUnavailable(VolditError, RuntimeError):
    """The perceptual network's pretrained weights could not be loaded (usually: no internet)."""


def build_perceptual_loss(spatial_dims: int = 3, network_type: str = "squeeze", **kwargs) -> PerceptualLoss:
    try:
        return PerceptualLoss(spatial_dims=spatial_dims, network_type=network_type, **kwargs)
    except Exception as error:  # MONAI raises whatever lpips / torch.hub raise when the download fails
        raise PerceptualUnavailable(
            f"the perceptual loss ({network_type!r}) needs pretrained weights that could not be loaded: "
            f"{type(error).__name__}: {error}. Either set stage1.perceptual_weight: 0 to train without it, "
            "or install the `lpips` package and place its weights in the torch hub cache ($TORCH_HOME) "
            "on a machine with internet access first."
        ) from error


class VQGANLoss(nn.Module):
    """Generator loss L1 + quantisation + w_p perceptual + w_adv adversarial + w_j spectral, and the
    discriminator's least-squares patch loss. Networks with weight 0 are never built."""

    def __init__(
        self,
        perceptual_weight: float = 0.005,
        adv_weight: float = 0.005,
        jukebox_weight: float = 0.0,
        perceptual_params: dict | None = None,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.perceptual_weight = perceptual_weight
        self.adv_weight = adv_weight
        self.jukebox_weight = jukebox_weight
        self.perceptual = (
            build_perceptual_loss(**(perceptual_params or {"spatial_dims": spatial_dims}))
            if perceptual_weight > 0
            else None
        )
        self.jukebox = JukeboxLoss(spatial_dims=spatial_dims) if jukebox_weight > 0 else None
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def generator(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        quantization_loss: torch.Tensor,
        discriminator: nn.Module | None,
        adversarial_on: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss and its parts; the adversarial term only when ``adversarial_on``."""
        recon, images = reconstructions.float(), images.float()
        parts = {"l1": F.l1_loss(recon, images), "quantization": quantization_loss.float().mean()}
        total = parts["l1"] + parts["quantization"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(recon, images)
            total = total + self.perceptual_weight * parts["perceptual"]
        if self.jukebox is not None:
            parts["spectral"] = self.jukebox(recon, images)
            total = total + self.jukebox_weight * parts["spectral"]
        if adversarial_on and self.adv_weight > 0 and discriminator is not None:
            logits = discriminator(reconstructions.contiguous())[-1]
            parts["g_adv"] = self.adversarial(logits, target_is_real=True, for_discriminator=False)
            total = total + self.adv_weight * parts["g_adv"]
        return total, parts

    def discriminator(
        self, discriminator: nn.Module, images: torch.Tensor, reconstructions: torch.Tensor
    ) -> torch.Tensor:
        fake = discriminator(reconstructions.detach().contiguous())[-1]
        real = discriminator(images.detach().contiguous())[-1]
        return 0.5 * (
            self.adversarial(fake, target_is_real=False, for_discriminator=True)
            + self.adversarial(real, target_is_real=True, for_discriminator=True)
        )


@torch.no_grad()
def init_codebook(
    vqvae: VQVAE, images: torch.Tensor, generator: torch.Generator | None = None, max_vectors: int = 65536
) -> None:
    """Seed the codebook on encoder outputs of ``images`` (B, 1, X, Y, Z) by k-means++ (D^2) sampling.

    A freshly built codebook (unit-normal entries) sits far from the encoder's outputs (spread ~0.02),
    so every vector maps to the same one or two codes and the decoder learns nothing. Codes drawn on the
    data, spread by k-means++ so that rare tissue gets codes as well as air, stay in use from the start.
    """
    quantizer = vqvae.quantizer.quantizer
    vectors = vqvae.encode(images).float().movedim(1, -1).reshape(-1, quantizer.embedding_dim)
    device = generator.device if generator is not None else vectors.device
    if vectors.shape[0] > max_vectors:
        keep = torch.randperm(vectors.shape[0], generator=generator, device=device)[:max_vectors]
        vectors = vectors[keep.to(vectors.device)]
    first = torch.randint(0, vectors.shape[0], (1,), generator=generator, device=device).to(vectors.device)
    codes = [vectors[first]]
    nearest = (vectors - codes[0]).square().sum(1)
    for _ in range(quantizer.num_embeddings - 1):
        weights = nearest.to(device) if nearest.sum() > 0 else torch.ones_like(nearest, device=device)
        pick = torch.multinomial(weights, 1, generator=generator).to(vectors.device)
        codes.append(vectors[pick])
        nearest = torch.minimum(nearest, (vectors - codes[-1]).square().sum(1))
    codes = torch.cat(codes)
    quantizer.embedding.weight.copy_(codes)
    quantizer.ema_w.copy_(codes)
    quantizer.ema_cluster_size.fill_(1.0)
