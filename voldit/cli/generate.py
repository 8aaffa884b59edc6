"""``voldit sample`` (unconditional volumes from a VolDiT) and ``voldit synthesize`` (one volume per
mask, from a TGCA, with the quality gate)."""

from __future__ import annotations

import argparse
import sys

from voldit.cli.common import cluster_flags, command, placement_flags
from voldit.config import ConfigError
from voldit.diffusion.samplers import SAMPLERS
from voldit.precision import PRECISIONS
from voldit.qc import RETRIES as QC_RETRIES
from voldit.qc import QCThresholds
from voldit.qc import parse as qc_parse

QC_DEFAULTS = QCThresholds()


def add_sample(verbs) -> None:
    smp = verbs.add_parser(
        "sample", help="unconditional volumes from a VolDiT checkpoint (or an epoch range)"
    )
    smp.add_argument(
        "--checkpoint", "--diff_ckpt", dest="checkpoint", default=None, help="VolDiT checkpoint directory"
    )
    smp.add_argument(
        "--run",
        "--diff_run_dir",
        dest="run",
        default=None,
        help="epoch-range mode: a training run folder (sample each checkpoints/epoch_NNNN in the range)",
    )
    smp.add_argument("--epoch-start", "--epoch_start", dest="epoch_start", type=int, default=None)
    smp.add_argument("--epoch-end", "--epoch_end", dest="epoch_end", type=int, default=None)
    smp.add_argument("--epoch-step", "--epoch_step", dest="epoch_step", type=int, default=1)
    smp.add_argument("--output", "--output_dir", dest="output", required=True, help="folder for the volumes")
    smp.add_argument("--n-samples", "--n_samples", dest="n_samples", type=int, default=4)
    smp.add_argument(
        "--reference",
        "--reference_nii",
        dest="reference",
        default=None,
        help="NIfTI whose affine (orientation, spacing) the samples get; default 1 mm isotropic",
    )
    smp.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    _sampling_flags(smp)


@command("sample")
def _sample(args: argparse.Namespace) -> int:
    from voldit import storage
    from voldit.sampling import epoch_checkpoints, write_samples

    settings = _settings(args)
    if args.run:
        if args.epoch_start is None or args.epoch_end is None:
            raise ConfigError("--run needs --epoch-start and --epoch-end (and optionally --epoch-step)")
        targets = [
            (path, storage.join(args.output, f"epoch_{epoch:04d}"))
            for epoch, path in epoch_checkpoints(args.run, args.epoch_start, args.epoch_end, args.epoch_step)
        ]
    elif args.checkpoint:
        targets = [(args.checkpoint, args.output)]  # strings: an s3:// URL stays one
    else:
        raise ConfigError("give --checkpoint (a VolDiT checkpoint) or --run with an epoch range")
    for checkpoint, folder in targets:
        written = write_samples(
            checkpoint,
            folder,
            args.n_samples,
            seed=args.seed,
            vqgan=args.vqgan,
            settings=settings,
            batch_size=args.batch_size,
            reference=args.reference,
            device=args.device,
        )
        print(
            f"{len(written)} volume(s) from {checkpoint} -> {folder} "
            f"(previews in {storage.join(folder, 'previews')})"
        )
    return 0


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampler and its budget, shared by sample and synthesize; `_settings` reads them back."""
    parser.add_argument(
        "--vqgan",
        "--stage1_ckpt",
        dest="vqgan",
        default=None,
        help="VQ-GAN checkpoint (default: the one recorded in the diffusion checkpoint)",
    )
    parser.add_argument(
        "--sampler",
        "--scheduler",
        dest="sampler",
        choices=SAMPLERS,
        default="ddpm",
        help="ddpm (the paper's, 300 steps), ddim, or dpmpp (DPM-Solver++(2M))",
    )
    parser.add_argument("--steps", "--timesteps", dest="steps", type=int, default=300, help="denoising steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic; ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (rows without a seed column)")
    parser.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, default=4, help="volumes per pass"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="autocast (auto: bf16 on GPU)",
    )
    parser.add_argument(
        "--decode",
        choices=["auto", "direct", "tiled"],
        default="auto",
        help="VQ-GAN decode whole or in tiles (auto: whole, tiles when out of memory)",
    )
    parser.add_argument(
        "--decode-tile", type=int, default=16, help="latent voxels per tile axis for tiled decoding"
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay the denoiser from CUDA graphs (GPU; pays for small models and batches)",
    )


def _settings(args: argparse.Namespace):
    from voldit.sampling import SamplingSettings

    try:
        return SamplingSettings(
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            guidance=getattr(args, "guidance", 1.0),
            precision=args.precision,
            decode=args.decode,
            decode_tile=args.decode_tile,
            cuda_graphs=args.cuda_graphs,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def add_synthesize(verbs) -> None:
    syn = verbs.add_parser(
        "synthesize", help="one conditional volume per mask row of a CSV, as a Ray Data batch job"
    )
    syn.add_argument(
        "--csv", required=True, help="rows with one mask column per condition key, optional id and seed"
    )
    syn.add_argument("--tgca", "--tgca_ckpt", dest="tgca", required=True, help="TGCA checkpoint directory")
    syn.add_argument("--output", "--output_dir", dest="output", required=True, help="output folder")
    syn.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1.0: none)")
    syn.add_argument("--workers", type=int, default=1, help="synthesizer actors at most (one per GPU)")
    syn.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (0: CPU)")
    placement_flags(syn)
    syn.add_argument("--no-previews", action="store_true", help="skip the preview PNGs and contact sheet")
    _qc_flags(syn)
    cluster_flags(syn)
    _sampling_flags(syn)


@command("synthesize")
def _synthesize(args: argparse.Namespace) -> int:
    from voldit.distributed.synthesize import synthesize

    summary = synthesize(
        args.csv,
        args.tgca,
        args.output,
        vqgan=args.vqgan,
        settings=_settings(args),
        seed=args.seed,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        allow_unseen_labels=args.allow_unseen_labels,
        previews=not args.no_previews,
        address=args.address,
        qc=_qc(args),
        field_of_view=args.field_of_view,
        label_map=args.label_map,
    )
    rate = f" ({summary.volumes_per_hour:,.0f} volumes/h)" if summary.volumes_per_hour else ""
    print(
        f"{summary.total} rows: {summary.synthesized} synthesised{rate}, {summary.skipped} already done, "
        f"{len(summary.failed)} failed"
    )
    if summary.qc:
        from voldit.synthesis import qc_line

        print(qc_line(summary.qc))
    print(f"manifest: {summary.manifest}")
    if summary.contact_sheet:
        print(f"contact sheet: {summary.contact_sheet}")
    if summary.failed:
        for row in summary.failed[:10]:
            print(f"  failed {row['id']}: {row['error']}", file=sys.stderr)
        print(
            f"voldit synthesize: {len(summary.failed)} row(s) failed; see {summary.manifest}", file=sys.stderr
        )
        return 1
    return 0


def _qc_flags(parser: argparse.ArgumentParser) -> None:
    """The quality gate's switch and thresholds; each left unset defers to the TGCA config (see `_qc`)."""
    parser.add_argument(
        "--qc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check each volume's HU per label against the real training data and sample failures again "
        "(default: the TGCA config's tgca.qc.enabled)",
    )
    parser.add_argument(
        "--qc-retries",
        type=int,
        help=f"samplings with the next seed after a failed gate (default: tgca.qc.retries, {QC_RETRIES})",
    )
    parser.add_argument(
        "--qc-min-inside",
        type=float,
        help="share of a label's voxels that must lie in the real 5-95%% HU range "
        f"(default: tgca.qc.min_inside, {QC_DEFAULTS.min_inside})",
    )
    parser.add_argument(
        "--qc-min-voxels",
        type=int,
        help=f"labels with fewer voxels are not judged (default: tgca.qc.min_voxels, {QC_DEFAULTS.min_voxels})",
    )


def _qc(args: argparse.Namespace) -> dict | None:
    """The quality gate's settings: the TGCA config's tgca.qc, with the flags given on top; None when
    the gate is off (tgca.qc.enabled false without --qc, or --no-qc)."""
    from voldit import storage
    from voldit.checkpoint import load_checkpoint
    from voldit.config import gate_settings

    storage.check(args.tgca, "TGCA checkpoint")  # one clear error for a bad bucket or credentials
    gate = load_checkpoint(args.tgca, stage="tgca").config.tgca.qc
    if not (gate.enabled if args.qc is None else args.qc):
        return None
    qc = gate_settings(gate)
    given = {"min_voxels": args.qc_min_voxels, "min_inside": args.qc_min_inside, "retries": args.qc_retries}
    qc.update({k: v for k, v in given.items() if v is not None})
    try:
        qc_parse(qc)  # the one check of the gate's settings
    except ValueError as error:
        raise ConfigError(f"quality gate: {error} (--qc-min-voxels, --qc-min-inside, --qc-retries)") from None
    return qc
