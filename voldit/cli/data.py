"""``voldit encode``: CT volumes (and masks) to a latent dataset, with Ray Data."""

from __future__ import annotations

import argparse
import sys

from voldit.cli.common import cluster_flags, command


def add_encode(verbs) -> None:
    enc = verbs.add_parser(
        "encode", help="encode a CSV of CT volumes (and masks) into a latent dataset with Ray Data"
    )
    enc.add_argument(
        "--csv", required=True, help="manifest with an `image` column (and one per condition key)"
    )
    enc.add_argument(
        "--vqgan", "--vqvae_ckpt", dest="vqgan", required=True, help="VQ-GAN checkpoint directory"
    )
    enc.add_argument("--output", "--output_dir", dest="output", required=True, help="latent dataset folder")
    enc.add_argument(
        "--condition-keys",
        "--condition_keys",
        dest="condition_keys",
        nargs="*",
        default=[],
        help="mask columns to preprocess and store beside the latents, for TGCA",
    )
    enc.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=1,
        help="volumes per encoder call (and per parquet part)",
    )
    enc.add_argument("--workers", type=int, default=1, help="encoder actors at most")
    enc.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per encoder actor (0: CPU)")
    cluster_flags(enc)


@command("encode")
def _encode(args: argparse.Namespace) -> int:
    from voldit.distributed.encode import encode
    from voldit.encode import ERRORS_FILE

    summary = encode(
        args.csv,
        args.vqgan,
        args.output,
        condition_keys=args.condition_keys,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        address=args.address,
    )
    print(
        f"{summary.total} rows: {summary.encoded} encoded, {summary.skipped} already done, "
        f"{len(summary.failed)} failed"
    )
    if summary.info is not None:
        print(
            f"latents in {args.output}: {summary.info.rows} rows of {summary.info.latent_shape}, "
            f"scale factor {summary.info.scale_factor:.4f} (stored in dataset.json)"
        )
    if summary.failed:
        for row in summary.failed[:10]:
            print(f"  failed {row['id']}: {row['reason']}", file=sys.stderr)
        print(
            f"voldit encode: {len(summary.failed)} row(s) failed; see {args.output}/{ERRORS_FILE}",
            file=sys.stderr,
        )
        return 1
    return 0
