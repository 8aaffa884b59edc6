"""CUDA graphs for the sampling loop: the denoiser's kernels recorded once, replayed at every step.

A sampler calls the same network hundreds of times on inputs of one shape. Replaying a recorded graph
skips the per-kernel launch cost on the CPU, which is what bounds small models and small batches.
"""

from __future__ import annotations

import contextlib

import torch

from voldit.diffusion.samplers import Denoise


class GraphedDenoiser:
    """``denoise(x, t, **cond)`` replayed from a CUDA graph, one graph per input signature.

    The first call with a new signature (shapes, dtypes, keyword names) warms the network up on a side
    stream and records it; later calls copy their inputs into the recorded buffers and replay. Autocast
    active at recording time is recorded with its weight casts (its cache is off while recording, so no
    graph reads a cached cast that autocast frees later). The output is a fresh tensor on every call.
    Gradients are not supported: call it under ``torch.no_grad()``.
    """

    def __init__(self, denoise: Denoise, warmup: int = 2) -> None:
        self.denoise = denoise
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors, got {x.device}")
        inputs = {"x": x, "t": t, **cond}
        key = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(inputs.items()))
        if key not in self._graphs:
            self._graphs[key] = self._record(inputs)
        graph, static, out = self._graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return out.clone()

    def _autocast(self, device: torch.device):
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
        dtype = torch.get_autocast_dtype(device.type)
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)

    def _record(self, inputs: dict[str, torch.Tensor]):
        static = {k: v.clone() for k, v in inputs.items()}
        x, t = static["x"], static["t"]
        cond = {k: v for k, v in static.items() if k not in ("x", "t")}
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), self._autocast(x.device):
            for _ in range(self.warmup):
                self.denoise(x, t, **cond)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast(x.device):
            out = self.denoise(x, t, **cond)
        return graph, static, out
