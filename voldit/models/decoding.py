"""Decoding latents with the VQ-GAN whole or in tiles, so a 512x512x256 volume fits a modest GPU.

The decoder is fully convolutional with no normalisation across the volume, so a tile decoded with
enough latent context around it (``halo``, at least the decoder's receptive radius) equals the same
region of a whole decode: tiles are decoded with their halo and only their centres are kept. There is no
blending, hence no seams beyond floating-point noise. MONAI's sliding-window inference blends overlapping
windows instead (Gaussian or constant weights), which is approximate for a decoder that maps a latent
window to a larger image; this is exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from monai.networks.nets import VQVAE

DEFAULT_HALO = 8  # latent voxels; the seed VQ-GAN's decoder sees about 6 latent voxels to each side


def decode(vq: VQVAE, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, d, h, w) -> images (B, 1, d*f, h*f, w*f) in one pass."""
    return vq.decode_stage_2_outputs(z)


def decode_tiled(
    vq: VQVAE,
    z: torch.Tensor,
    factor: int,
    tile: int | Sequence[int] = 16,
    halo: int = DEFAULT_HALO,
    out_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Latents (B, C, d, h, w) -> float32 images (B, 1, d*f, h*f, w*f) assembled on ``out_device``.

    Each tile of ``tile`` latent voxels per axis is decoded with ``halo`` latent voxels of context on
    every side (less at the volume's borders, where a whole decode sees the same zero padding). Peak
    accelerator memory is that of decoding one tile with its halo.
    """
    spatial = z.shape[2:]
    tile = [tile] * len(spatial) if isinstance(tile, int) else list(tile)
    out = torch.empty((z.shape[0], 1, *(n * factor for n in spatial)), dtype=torch.float32, device=out_device)
    axes = [range(0, n, t) for n, t in zip(spatial, tile, strict=True)]
    for starts in itertools.product(*axes):
        ends = [min(s + t, n) for s, t, n in zip(starts, tile, spatial, strict=True)]
        lo = [max(s - halo, 0) for s in starts]
        hi = [min(e + halo, n) for e, n in zip(ends, spatial, strict=True)]
        context = z[(slice(None), slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))]
        image = vq.decode_stage_2_outputs(context)
        keep = tuple(
            slice((s - a) * factor, (e - a) * factor) for s, e, a in zip(starts, ends, lo, strict=True)
        )
        target = tuple(slice(s * factor, e * factor) for s, e in zip(starts, ends, strict=True))
        out[(slice(None), slice(None), *target)] = (
            image[(slice(None), slice(None), *keep)].float().to(out_device)
        )
    return out
