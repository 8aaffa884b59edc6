"""Peak GPU memory and time of the seed VQ-GAN's direct (untiled) encode and decode of one volume.

python bench/vqgan_memory.py --roi 512 512 256 --out vqgan.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, header, timed  # noqa: E402

from voldit.models.vqgan import build_vqvae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--roi", type=int, nargs=3, default=[512, 512, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_vqvae().to(device).eval()
    image = torch.rand(1, 1, *args.roi, device=device) * 2 - 1
    latent = torch.randn(1, 8, *(s // 8 for s in args.roi), device=device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, fn in (
            ("encode", lambda: model.encode_stage_2_inputs(image)),
            ("decode", lambda: model.decode_stage_2_outputs(latent)),
        ):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            row = {
                "op": name,
                "dtype": str(dtype).removeprefix("torch."),
                "roi": "x".join(map(str, args.roi)),
            }
            try:
                with (
                    torch.no_grad(),
                    torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
                ):
                    row["seconds"] = timed(fn, device, warmup=1, iters=2)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    emit(
        rows,
        header(device, " ".join(sys.argv)),
        ["op", "dtype", "roi", "seconds", "peak_mem_gb", "error"],
        args.out,
    )


if __name__ == "__main__":
    main()
