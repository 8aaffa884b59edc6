"""Multi-head self-attention with selectable kernels: torch SDPA (default), one SDPA kernel pinned
(flash, cudnn, efficient), xformers, or plain math."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "flash", "cudnn", "efficient", "xformers", "math")
# A pinned kernel is tried first; where it cannot run (the CPU has no cuDNN or memory-efficient kernel,
# flash needs fp16/bf16 on GPU) SDPA falls back along this order rather than failing.
_PINNED = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
_FALLBACK = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve_backend(backend: str) -> str:
    """Validate ``backend``; "xformers" falls back to "sdpa" when xformers is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xformers" and not xformers_available():
        return "sdpa"
    return backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention on (B, H, N, D) tensors: softmax(q k^T / sqrt(D)) v, materialising the N x N map."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class Attention(nn.Module):
    """Self-attention over tokens (B, N, C); parameter names ``qkv`` and ``proj`` match the reference."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = resolve_backend(backend)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.backend == "xformers":
            import xformers.ops as xops

            q, k, v = qkv.unbind(2)  # each (B, N, H, D), the layout xformers expects
            out = xops.memory_efficient_attention(q, k, v, p=dropout_p)  # (B, N, H, D)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
            if self.backend == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif self.backend in _PINNED:
                first = _PINNED[self.backend]
                with sdpa_kernel([first] + [b for b in _FALLBACK if b != first], set_priority=True):
                    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                out = math_attention(q, k, v, dropout_p)
            out = out.transpose(1, 2)  # (B, N, H, D)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))
