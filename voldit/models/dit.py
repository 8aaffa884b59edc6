"""VolDiT: a 3D Diffusion Transformer over latent volumes (AdaLN-Zero blocks, 3D sin-cos positions).

Pure torch. Parameter names follow the paper authors' implementation so their weights load as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from voldit.models.attention import Attention

# Size presets of the paper (Table of configs); patch size is chosen separately (2 or 4).
DIT_SIZES: dict[str, dict[str, int]] = {
    "XS": dict(depth=6, hidden_size=384, num_heads=6),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1152, num_heads=16),
}
DIT_MODELS: dict[str, dict[str, int]] = {
    f"VolDiT-{size}/{p}": {**dims, "patch_size": p} for size, dims in DIT_SIZES.items() for p in (2, 4)
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation of tokens (B, N, C) by per-sample shift and scale (B, C)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sin-cos embedding (len(positions), dim) of integer positions; dim must be even."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed 3D sin-cos position table (prod(grid), dim), rows in (D, H, W) raster order.

    Each axis gets an equal even share of the width; dim is padded up to a multiple of 6 and cut back.
    """
    per_axis = (dim + (-dim) % 6) // 3
    axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    table = torch.cat([sincos_1d(per_axis, a.reshape(-1)) for a in axes], dim=1)
    return table[:, :dim].float()


class TimestepEmbedder(nn.Module):
    """Timestep t (B,) -> (B, hidden): 256-wide sinusoidal frequencies followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> dropout -> fc2 -> dropout (names as in timm's Mlp)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DiTBlock(nn.Module):
    """AdaLN-Zero transformer block; an optional control (B, N, C) is added to the modulated attention input.

    ``dropout`` applies after the attention projection and in the MLP, ``attention_dropout`` to the
    attention weights (softmax(q k^T)).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        attention: str,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.control_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(
            hidden_size,
            num_heads,
            qkv_bias=True,
            attn_drop=attention_dropout,
            proj_drop=dropout,
            backend=attention,
        )
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if control is not None:
            h = h + self.control_norm(control).to(h.dtype)
        x = x + gate_msa.unsqueeze(1) * self.attn(h)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """AdaLN-modulated LayerNorm and a linear map from each token to its p^3 x C output voxels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_size**3 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchEmbed3D(nn.Module):
    """Non-overlapping p x p x p patches of (B, C, D, H, W) -> tokens (B, D/p * H/p * W/p, hidden)."""

    def __init__(
        self, input_size: Sequence[int], patch_size: int, in_channels: int, hidden_size: int
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = tuple(s // patch_size for s in input_size)
        self.num_patches = math.prod(self.grid_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, hidden)


class DiT3D(nn.Module):
    """VolDiT denoiser: latent (B, C, D, H, W) and timestep (B,) -> prediction of the same shape.

    The forward pass is ``embed`` -> ``run_blocks`` -> ``head``; adapters such as TGCA drive these pieces
    and pass one control tensor per block. ``dropout`` acts after each attention projection and in each
    MLP, ``attention_dropout`` on the attention weights (the authors' trained models: 0.1 and 0).
    """

    def __init__(
        self,
        input_size: Sequence[int] = (64, 64, 32),
        patch_size: int = 4,
        in_channels: int = 8,
        hidden_size: int = 1152,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attention: str = "sdpa",
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if any(s % patch_size for s in input_size):
            raise ValueError(f"input_size {list(input_size)} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size = tuple(input_size)
        self.in_channels = self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.x_embedder = PatchEmbed3D(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Fixed, not learned; persistent so the state dict matches the reference layout.
        self.register_buffer("pos_embed", sincos_3d(hidden_size, self.x_embedder.grid_size).unsqueeze(0))
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, dropout, attention, attention_dropout)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # AdaLN-Zero: every block starts as the identity and the output as zero.
        for linear in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches

    def embed(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, hidden) with positions added, and the timestep conditioning (B, hidden)."""
        if tuple(x.shape[2:]) != self.input_size or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected latents (B, {self.in_channels}, {', '.join(map(str, self.input_size))}), "
                f"got {tuple(x.shape)}"
            )
        return self.x_embedder(x) + self.pos_embed.to(x.dtype), self.t_embedder(t)

    def run_blocks(
        self, tokens: torch.Tensor, c: torch.Tensor, controls: Sequence[torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, None if controls is None else controls[i])
        return tokens

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unpatchify(self.final_layer(tokens, c))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p^3 * C) -> (B, C, D, H, W)."""
        b = x.shape[0]
        p = self.x_embedder.patch_size
        d, h, w = self.x_embedder.grid_size
        x = x.reshape(b, d, h, w, p, p, p, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, D, p, H, p, W, p)
        return x.reshape(b, self.out_channels, d * p, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t)
        return self.head(self.run_blocks(tokens, c), c)


def compile_blocks(model: nn.Module, eager_rng: bool = True) -> nn.Module:
    """Compile each transformer block in place (regional compilation) and return the model.

    The blocks are alike, so one compiled block serves all of them: compiling takes seconds instead of
    the minutes a whole-model graph of a 24-block VolDiT-L takes, and parameter names do not change.
    With ``eager_rng`` dropout draws its masks with PyTorch's own RNG kernels (Inductor's
    ``fallback_random``) instead of Inductor's per-element Philox: a compiled block then drops exactly
    what the eager block drops from the same seed.
    """
    options = {"fallback_random": True} if eager_rng else None
    for module in model.modules():
        if isinstance(module, DiTBlock):
            module.compile(options=options)
    return model


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
