"""The fast paths, each checked against its plain counterpart, and the sampling loop's CUDA graphs timed.

Three parts, each printed as a table and written into one JSON document:

- ``attention``: forward + backward milliseconds of each SDPA kernel (math, flash, memory-efficient,
  cuDNN) at VolDiT-L/4's shape (16 heads of 72 over 2048 tokens), and each one's error against float32
  math attention (dropout off).
- ``equality``: every switchable fast path against the plain computation on a VolDiT with random
  weights (AdaLN-Zero's zero layers included, so every block does work), with the tolerance it must meet:
  bf16 autocast, each attention kernel, torch.compile (whole model and per block; per block also in
  training mode with dropout, where ATen's RNG must reproduce eager's masks), fused AdamW, and sampling
  from CUDA graphs (plain VolDiT, and TGCA with classifier-free guidance); and that the DDPM loop never
  makes the host wait for the device. ``ok`` is false where a path misses its tolerance.
- ``graphs``: seconds per volume of a DDIM-50 denoising loop, eager and from CUDA graphs, for small and
  large models and batches.

    python bench/fastpaths.py --out fastpaths.json              # GPU: VolDiT-S/4 at 64x64x32
    python bench/fastpaths.py --model VolDiT-XS/4 --input-size 16 16 8 --graph-models  # CPU: no graphs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import emit, header, timed  # noqa: E402

from voldit.diffusion import NoiseSchedule, diffusion_loss, sample  # noqa: E402
from voldit.diffusion.graphs import GraphedDenoiser  # noqa: E402
from voldit.diffusion.samplers import classifier_free  # noqa: E402
from voldit.models.attention import math_attention  # noqa: E402
from voldit.models.dit import DIT_MODELS, DiT3D, compile_blocks  # noqa: E402
from voldit.models.tgca import TGCA3D  # noqa: E402

KERNELS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def attention_kernels(device, batch: int, heads: int, tokens: int, head_dim: int) -> list[dict]:
    rows = []
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g, device=device) for _ in range(3))
    reference = math_attention(q, k, v)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, kernel in KERNELS.items():
        for dropout in (0.0, 0.1):
            row = {"kernel": name, "dtype": str(dtype).removeprefix("torch."), "dropout": dropout}
            qh, kh, vh = (t.to(dtype).requires_grad_() for t in (q, k, v))
            try:
                with sdpa_kernel([kernel]):
                    if dropout == 0.0:
                        with torch.no_grad():
                            out = F.scaled_dot_product_attention(qh, kh, vh)
                        row["rel_error"] = rel_error(out, reference)

                    def step(qh=qh, kh=kh, vh=vh, dropout=dropout):
                        out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout)
                        out.backward(torch.ones_like(out))

                    row["fwd_bwd_ms"] = timed(step, device, 2, 10) * 1e3
            except RuntimeError as error:
                row["error"] = str(error).splitlines()[0][:80]
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def give_weight(module: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised layers (AdaLN-Zero, TGCA's output conv and gate) get random weights."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return module


def random_dit(name: str, input_size, device, attention: str = "sdpa", dropout: float = 0.0) -> DiT3D:
    torch.manual_seed(0)
    # Dropout everywhere, attention weights included: the compile check's masks cover every draw.
    model = DiT3D(
        **DIT_MODELS[name],
        input_size=input_size,
        attention=attention,
        dropout=dropout,
        attention_dropout=dropout,
    )
    return give_weight(model).to(device).eval()


def equality(name: str, input_size, device) -> list[dict]:
    rows = []

    def check(path: str, error: float, tolerance: float, note: str = "") -> None:
        rows.append(
            {"path": path, "error": error, "tolerance": tolerance, "ok": error <= tolerance, "note": note}
        )
        print(rows[-1], file=sys.stderr, flush=True)

    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = random_dit(name, input_size, device)
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(4, 8, *input_size, generator=g, device=device)
    t = torch.tensor([0, 50, 150, 299], device=device)
    with torch.no_grad():
        want = model(x, t)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            check(
                "bf16 autocast vs float32",
                rel_error(model(x, t), want),
                2e-2,
                "relative L2 of the prediction",
            )
        for backend in ("flash", "cudnn", "efficient", "math"):
            other = random_dit(name, input_size, device, attention=backend)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                got = other(x, t)
            tolerance = 2e-2 if cuda else 1e-5
            check(f"attention {backend} vs float32 sdpa", rel_error(got, want), tolerance, "bf16 on GPU")
        compiled = torch.compile(random_dit(name, input_size, device))
        check("torch.compile (model) vs eager", rel_error(compiled(x, t), want), 1e-4, "float32, no TF32")
        blocks = compile_blocks(random_dit(name, input_size, device))
        check("torch.compile (blocks) vs eager", rel_error(blocks(x, t), want), 1e-4, "float32, no TF32")

        # Training mode, the reference's dropout 0.1: blocks compiled with ATen's RNG draw eager's masks.
        dropped = random_dit(name, input_size, device, dropout=0.1).train()
        torch.manual_seed(3)
        want_train = dropped(x, t)
        dropped = compile_blocks(dropped, eager_rng=True)
        torch.manual_seed(3)
        check(
            "torch.compile (blocks, ATen RNG) vs eager, dropout 0.1",
            rel_error(dropped(x, t), want_train),
            1e-4,
            "training mode, same seed, float32",
        )

    # Fused AdamW against the for-each implementation: five steps on identical gradients.
    plain, fused = random_dit(name, input_size, device).train(), random_dit(name, input_size, device).train()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3, foreach=True)
    opt_fused = torch.optim.AdamW(fused.parameters(), lr=1e-3, fused=True)
    schedule = NoiseSchedule(300, "cosine", "v_prediction")
    for step in range(5):
        torch.manual_seed(step)
        diffusion_loss(plain, schedule, x).backward()
        for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
            b.grad = a.grad.clone()
        opt_plain.step(), opt_fused.step()
        opt_plain.zero_grad(), opt_fused.zero_grad()
    worst = max(
        float((a - b).detach().abs().max())
        for a, b in zip(plain.parameters(), fused.parameters(), strict=True)
    )
    check("fused AdamW vs for-each AdamW", worst, 1e-6, "max |param diff| after 5 steps, lr 1e-3")

    if cuda:  # CUDA graphs: the same DDIM-10 latents, bf16 autocast as in sampling
        gens = [torch.Generator().manual_seed(k) for k in range(2)]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            eager = sample(model, schedule, (2, 8, *input_size), gens, "ddim", 10, device=device)
            gens = [torch.Generator().manual_seed(k) for k in range(2)]
            graphed = sample(
                GraphedDenoiser(model), schedule, (2, 8, *input_size), gens, "ddim", 10, device=device
            )
        check("CUDA graphs vs eager sampling (DDIM-10)", rel_error(graphed, eager), 1e-5, "bf16 autocast")
        check(
            "CUDA graphs vs eager, TGCA + guidance 4.0 (DDIM-10)",
            tgca_graph_error(model, schedule, input_size, device),
            1e-5,
            "bf16 autocast, null condition shared",
        )
        synced, note = host_syncs_in_sampling(model, schedule, input_size, device)
        check("host waits for the device in DDPM sampling", synced, 0.0, note)
    return rows


def host_syncs_in_sampling(model: DiT3D, schedule, input_size, device) -> tuple[float, str]:
    """1.0 (and the first synchronising call) if a DDPM loop with CPU generators makes the host wait for
    the device at any step, else 0.0: the host should draw the next step's noise while the device
    denoises. The first run copies the schedule's table to the device (a one-off wait)."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for strict in (False, True):
            gens = [torch.Generator().manual_seed(k) for k in range(2)]
            torch.cuda.set_sync_debug_mode("error" if strict else "default")
            try:
                sample(model, schedule, (2, 8, *input_size), gens, "ddpm", 4, device=device)
            except RuntimeError as error:
                return 1.0, str(error).splitlines()[0][:80]
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return 0.0, "none"


def tgca_graph_error(model: DiT3D, schedule, input_size, device) -> float:
    """Guided TGCA sampling as the Synthesizer runs it (features once per volume, the null condition's
    features a constant of the graph), eager against CUDA graphs."""
    tgca = give_weight(TGCA3D(model, condition_channels=2)).to(device).eval()
    g = torch.Generator(device).manual_seed(2)
    condition = (torch.rand(2, 2, *(2 * s for s in input_size), generator=g, device=device) > 0.7).float()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        features = tgca.condition_features(condition)
        null = tgca.condition_features(torch.zeros_like(condition[:1]))

        def denoise(x, t, features):
            return tgca(x, t, features=features)

        guided = classifier_free(denoise, 4.0, unconditional={"features": null})
        out = []
        for net in (guided, GraphedDenoiser(guided)):
            gens = [torch.Generator().manual_seed(k) for k in range(2)]
            shape = (2, 8, *input_size)
            out.append(sample(net, schedule, shape, gens, "ddim", 10, device=device, features=features))
    return rel_error(out[1], out[0])


def graph_timing(models: list[str], batches: list[int], input_size, device, steps: int = 50) -> list[dict]:
    rows = []
    schedule = NoiseSchedule(300, "cosine", "v_prediction")
    for name in models:
        model = random_dit(name, input_size, device)
        for batch in batches:
            row = {"model": name, "batch": batch, "sampler": f"ddim-{steps}"}
            for label, denoise in (("eager", model), ("graphs", GraphedDenoiser(model))):

                def run(denoise=denoise, batch=batch):
                    gens = [torch.Generator().manual_seed(k) for k in range(batch)]
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        sample(denoise, schedule, (batch, 8, *input_size), gens, "ddim", steps, device=device)

                # one warm-up run (it records the graph), then one timed run
                row[f"{label}_s_per_volume"] = timed(run, device, 1, 1) / batch
            row["speedup"] = row["eager_s_per_volume"] / row["graphs_s_per_volume"]
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="VolDiT-S/4", choices=list(DIT_MODELS), help="for the equality checks"
    )
    parser.add_argument("--input-size", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument(
        "--attention-shape", type=int, nargs=4, default=[8, 16, 2048, 72], metavar=("B", "H", "N", "D")
    )
    parser.add_argument("--graph-models", nargs="*", default=["VolDiT-XS/4", "VolDiT-B/4", "VolDiT-L/4"])
    parser.add_argument("--graph-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    attention = attention_kernels(device, *args.attention_shape)
    emit(attention, {}, ["kernel", "dtype", "dropout", "fwd_bwd_ms", "rel_error", "error"], None, False)
    checks = equality(args.model, args.input_size, device)
    emit(checks, {}, ["path", "error", "tolerance", "ok", "note"], None, False)
    graphs = []
    if device.type == "cuda" and args.graph_models:
        graphs = graph_timing(args.graph_models, args.graph_batches, args.input_size, device)
        emit(
            graphs,
            {},
            ["model", "batch", "sampler", "eager_s_per_volume", "graphs_s_per_volume", "speedup"],
            None,
            False,
        )
    doc = {**header(device, " ".join(sys.argv)), "attention": attention, "equality": checks, "graphs": graphs}
    print(json.dumps(doc))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    if not all(row["ok"] for row in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
