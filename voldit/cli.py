"""The ``voldit`` command line: one verb per task."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from voldit.config import ConfigError, load_config, stage_of, to_yaml
from voldit.diffusion.samplers import SAMPLERS
from voldit.qc import RETRIES as QC_RETRIES
from voldit.qc import QCThresholds
from voldit.qc import parse as qc_parse

log = logging.getLogger("voldit")
QC_DEFAULTS = QCThresholds()

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        _COMMANDS[name] = fn
        return fn

    return register


def _fmt(n: float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:.4g}"


@command("info")
def _info(args: argparse.Namespace) -> int:
    from voldit.builders import describe

    cfg = load_config(*args.config, overrides=args.set)
    info = describe(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        shown = _fmt(value) if isinstance(value, int | float) else value
        if key.endswith("flops"):
            shown = f"{value / 1e12:.3f} TFLOP ({_fmt(value)})"
        print(f"{key.replace('_', ' '):<{width}}  {shown}")
    return 0


@command("config validate")
def _validate(args: argparse.Namespace) -> int:
    failures = 0
    for path in args.files:
        try:
            cfg = load_config(path)
            print(f"ok      {path} ({stage_of(cfg)})")
        except ConfigError as error:
            failures += 1
            print(f"invalid {error}")
    return 1 if failures else 0


@command("config show")
def _show(args: argparse.Namespace) -> int:
    if args.files or args.set:
        cfg = load_config(*args.files, overrides=args.set)
    else:
        cfg = load_config({"stage1": {}, "dit": {}, "tgca": {}})
    print(to_yaml(cfg), end="")
    return 0


@command("import-reference")
def _import_reference(args: argparse.Namespace) -> int:
    from voldit.reference import import_reference

    cfg = load_config(*args.config)
    path = import_reference(args.checkpoint, cfg, args.output, scale_factor=args.scale_factor)
    print(f"imported {args.checkpoint} -> {path}")
    return 0


@command("encode")
def _encode(args: argparse.Namespace) -> int:
    from voldit.distributed.encode import ERRORS_FILE, encode

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


@command("train")
def _train(args: argparse.Namespace) -> int:
    from voldit.distributed.train import train

    files = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c] + args.set
    cfg = load_config(*files, overrides=overrides)
    result = train(
        cfg,
        args.stage,
        args.train,
        args.val,
        dit=args.dit,
        vqgan=args.vqgan,
        name=args.name,
        storage=args.storage,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        max_failures=args.max_failures,
        address=args.address,
    )
    print(
        f"trained {args.stage} to epoch {result.metrics.get('epoch')}, step {result.metrics.get('step')}; "
        f"validation loss {result.metrics.get('val_loss')}"
    )
    from voldit import storage

    run = result.remote_run_dir or result.run_dir
    print(
        f"checkpoints: {storage.join(run, 'checkpoints')} (latest, best, epoch_NNNN); "
        f"TensorBoard: tensorboard --logdir {storage.join(run, 'tensorboard')}"
    )
    return 0


@command("sweep")
def _sweep(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from voldit.distributed.sweep import parse_grid, sweep

    files = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c] + args.set
    base = OmegaConf.to_container(load_config(*files, overrides=overrides), resolve=True)
    result = sweep(
        base,
        args.train,
        args.val,
        models=args.models,
        grid=parse_grid(args.grid),
        name=args.name,
        storage=args.storage,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
        grace_period=args.grace_period,
        address=args.address,
    )
    shown = result.table.drop(columns=["checkpoint"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"results: {result.results_file}")
    if result.best_checkpoint is None:
        print("voldit sweep: no trial finished with a validation loss", file=sys.stderr)
        return 1
    print(f"best trial: {result.best_trial}; checkpoint: {result.best_checkpoint}")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from voldit.demo import DEFAULT_QC, run_demo

    results = run_demo(args.output, args.cache, overrides=args.set, qc=None if args.no_qc else DEFAULT_QC)
    return _pipeline_status("demo", results)


@command("pipeline")
def _pipeline(args: argparse.Namespace) -> int:
    from voldit.demo import DEFAULT_QC, run_demo, run_pipeline

    synthesis = dict(
        field_of_view=args.field_of_view,
        label_map=args.label_map,
        allow_unseen_labels=args.allow_unseen_labels,
    )
    common = dict(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        qc=None if args.no_qc else DEFAULT_QC,
        synthesis=synthesis,
    )
    if args.example_data:
        return _pipeline_status("pipeline", run_demo(args.output, args.cache, args.set, **common))
    if not (args.train and args.val and args.masks):
        raise ConfigError("give --train, --val and --masks (CSV files), or --example-data")
    configs = {
        k: v
        for k, v in (("vqgan", args.vqgan_config), ("dit", args.dit_config), ("tgca", args.tgca_config))
        if v
    }
    results = run_pipeline(
        args.train, args.val, args.masks, args.output, configs=configs, overrides=args.set, **common
    )
    return _pipeline_status("pipeline", results)


def _pipeline_status(verb: str, results: dict) -> int:
    """Exit 1 when rows failed (they are listed in the report and above), else 0."""
    failed = results.get("failed") or []
    if not failed:
        return 0
    where = results.get("report") or results.get("synthetic") or "the output"
    print(f"voldit {verb}: {len(failed)} row(s) failed (listed above and in {where}); the rest finished",
          file=sys.stderr)  # fmt: skip
    return 1


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


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from voldit import storage
    from voldit.report import baseline_summary, baseline_table, write_report, yardstick_line

    for what, url in (("--generated", args.generated), ("--real", args.real)):
        storage.check(url, what)  # one clear error for a bad endpoint, credentials or bucket
    vqgan = args.vqgan
    run_info = storage.join(args.generated, "run.json")
    if vqgan is None and storage.exists(run_info):  # a `voldit synthesize` folder names its VQ-GAN
        vqgan = json.loads(storage.read_text(run_info)).get("vqgan")
    results = write_report(args.generated, args.real, args.output, vqgan=vqgan, size=args.size)
    print(yardstick_line(results))
    table = baseline_table(results)
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(baseline_summary(results))
    d = results["ms_ssim_diversity"]
    print(f"MS-SSIM within generated {d['generated']}, within real {d['real']}")
    if "mask_fidelity" in results:
        f = results["mask_fidelity"]
        print(
            f"mask fidelity: tissue Dice {f['tissue_dice_mean']}, median HU error per label "
            f"{f['label_median_hu_abs_error']} HU"
        )
    print(f"report: {Path(args.output) / 'report.md'} (evaluation.json, plots and previews beside it)")
    return 0


@command("scale-factor")
def _scale_factor(args: argparse.Namespace) -> int:
    from voldit.data.latents import load_info, rescale_from_tensors

    info = rescale_from_tensors(args.latents, args.limit) if args.recompute else load_info(args.latents)
    print(
        f"scale_factor {info.scale_factor:.6f} (latent std {info.latent_std:.6f}, mean {info.latent_mean:.6f})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voldit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    info = verbs.add_parser("info", help="parameters, tokens and forward FLOPs of a config's model")
    info.add_argument(
        "config", nargs="+", help="config YAML(s), merged left to right (e.g. a DiT and a TGCA config)"
    )
    info.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    info.add_argument("--json", action="store_true", help="print JSON")

    config = verbs.add_parser("config", help="validate or show configs")
    config_verbs = config.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    validate = config_verbs.add_parser("validate", help="check config files against the schema")
    validate.add_argument("files", nargs="+")
    show = config_verbs.add_parser("show", help="print the resolved config (all defaults when no file)")
    show.add_argument("files", nargs="*")
    show.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")

    imp = verbs.add_parser(
        "import-reference", help="convert the authors' .pth checkpoints to voldit checkpoints"
    )
    imp.add_argument("--checkpoint", required=True, help="the authors' .pth file (VQ-GAN, VolDiT or TGCA)")
    imp.add_argument(
        "--config",
        nargs="+",
        required=True,
        help="the config(s) it was trained with, e.g. configs/transformer/dit_ds8_l4.yaml",
    )
    imp.add_argument("--output", required=True, help="checkpoint directory to write")
    imp.add_argument(
        "--scale-factor",
        type=float,
        default=None,
        help="latent scale factor the VolDiT was trained with (the authors' --scale_factor)",
    )

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
    _cluster_flags(enc)

    tr = verbs.add_parser("train", help="train the VQ-GAN, VolDiT or TGCA with Ray Train (DDP)")
    tr.add_argument("config", nargs="+", help="config YAML(s), then any section.key=value overrides")
    tr.add_argument("--stage", required=True, choices=["vqgan", "dit", "tgca"])
    tr.add_argument(
        "--train",
        "--training_ids",
        dest="train",
        required=True,
        help="vqgan: image CSV; dit/tgca: latent folder from `voldit encode` (or an image CSV with --vqgan)",
    )
    tr.add_argument("--val", "--validation_ids", dest="val", default=None, help="validation data, as --train")
    tr.add_argument(
        "--dit", "--dit_ckpt", dest="dit", default=None, help="tgca: the VolDiT checkpoint to adapt"
    )
    tr.add_argument(
        "--vqgan",
        "--vqvae_ckpt",
        dest="vqgan",
        default=None,
        help="dit: encode images online with this frozen VQ-GAN (the seed's --no_precomputed_latents)",
    )
    tr.add_argument(
        "--name",
        "--run_name",
        dest="name",
        default=None,
        help="run name; re-running with the same name resumes (default: the stage)",
    )
    tr.add_argument(
        "--storage", "--output_dir", dest="storage", default="outputs", help="where runs are kept"
    )
    tr.add_argument("--workers", type=int, default=1, help="DDP workers (0: in this process)")
    tr.add_argument("--gpus-per-worker", type=float, default=0.0)
    tr.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    _cluster_flags(tr)

    sw = verbs.add_parser("sweep", help="Ray Tune sweep of VolDiT sizes x patch sizes (and other keys), ASHA")
    sw.add_argument(
        "config", nargs="+", help="base VolDiT config YAML(s), then any section.key=value overrides"
    )
    sw.add_argument("--train", required=True, help="training latent folder from `voldit encode`")
    sw.add_argument("--val", required=True, help="validation latent folder (trials are ranked on it)")
    sw.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="subset of sizes, e.g. XS/4 S/4 or VolDiT-B/2 (default: XS, S, B, L x p=2, 4)",
    )
    sw.add_argument(
        "--grid",
        nargs="*",
        default=[],
        metavar="KEY=V1,V2",
        help="more keys to sweep, e.g. optim.lr=1e-4,3e-4",
    )
    sw.add_argument("--name", default="sweep", help="sweep name; re-running it resumes its trials")
    sw.add_argument("--storage", default="outputs", help="where the sweep and its trials are kept")
    sw.add_argument("--workers", type=int, default=1, help="DDP workers per trial")
    sw.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker of each trial")
    sw.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as resources allow)")
    sw.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from, per trial")
    sw.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    sw.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    _cluster_flags(sw)

    demo = verbs.add_parser(
        "demo", help="the whole pipeline on real example CT with the tiny configs, with a report"
    )
    demo.add_argument(
        "--output", default="outputs/demo", help="where data, latents, runs, volumes and the report go"
    )
    demo.add_argument("--cache", default=".cache/examples", help="where the example CTs are kept")
    demo.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every stage")
    demo.add_argument("--no-qc", action="store_true", help="synthesise without the quality gate")

    pipe = verbs.add_parser(
        "pipeline", help="the whole pipeline (train all stages, encode, sample, synthesise, evaluate) on CSVs"
    )
    pipe.add_argument("--train", help="training CSV (image,mask)")
    pipe.add_argument("--val", help="validation CSV (image,mask)")
    pipe.add_argument("--masks", help="CSV of masks to synthesise from (mask, optional id and seed)")
    pipe.add_argument("--output", required=True, help="output folder or s3:// prefix")
    pipe.add_argument("--vqgan-config", default=None, help="VQ-GAN config (default: configs/tiny/vqgan.yaml)")
    pipe.add_argument("--dit-config", default=None, help="VolDiT config (default: configs/tiny/dit.yaml)")
    pipe.add_argument("--tgca-config", default=None, help="TGCA config (default: configs/tiny/tgca.yaml)")
    pipe.add_argument("--workers", type=int, default=1, help="DDP workers and actors per step")
    pipe.add_argument("--gpus-per-worker", type=float, default=0.0)
    pipe.add_argument(
        "--example-data", action="store_true", help="use the example CT sections (as `voldit demo`)"
    )
    pipe.add_argument(
        "--cache", default=".cache/examples", help="with --example-data: where the CTs are kept"
    )
    pipe.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every stage")
    pipe.add_argument("--no-qc", action="store_true", help="synthesise without the quality gate")
    _placement_flags(pipe)
    _cluster_flags(pipe, address=False)

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
    _placement_flags(syn)
    syn.add_argument("--no-previews", action="store_true", help="skip the preview PNGs and contact sheet")
    syn.add_argument(
        "--qc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="check each volume's HU per label against the real training data and sample failures again "
        "(default: the TGCA config's tgca.qc.enabled)",
    )
    syn.add_argument(
        "--qc-retries",
        type=int,
        help=f"samplings with the next seed after a failed gate (default: tgca.qc.retries, {QC_RETRIES})",
    )
    syn.add_argument(
        "--qc-min-inside",
        type=float,
        help="share of a label's voxels that must lie in the real 5-95%% HU range "
        f"(default: tgca.qc.min_inside, {QC_DEFAULTS.min_inside})",
    )
    syn.add_argument(
        "--qc-min-voxels",
        type=int,
        help=f"labels with fewer voxels are not judged (default: tgca.qc.min_voxels, {QC_DEFAULTS.min_voxels})",
    )
    _cluster_flags(syn)
    _sampling_flags(syn)

    ev = verbs.add_parser(
        "evaluate", help="compare generated volumes with real ones (and their masks); write a report"
    )
    ev.add_argument(
        "--generated",
        required=True,
        help="a `voldit synthesize` output folder, a folder of NIfTI files, or a CSV with an image column "
        "(local or s3://)",
    )
    ev.add_argument(
        "--real",
        required=True,
        help="a folder of NIfTI files, or a CSV with image (and mask) columns (local or s3://)",
    )
    ev.add_argument("--output", required=True, help="folder for evaluation.json, report.md, plots")
    ev.add_argument(
        "--vqgan",
        default=None,
        help="VQ-GAN checkpoint for the feature distance (default: a synthesize folder's own)",
    )
    ev.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=None,
        help="grid the set metrics compare on (default: VQ-GAN roi)",
    )

    scale = verbs.add_parser(
        "scale-factor", help="show, or recompute from the tensors, a latent dataset's scale factor"
    )
    scale.add_argument("latents", help="latent dataset folder")
    scale.add_argument("--recompute", action="store_true", help="recompute from the stored latents")
    scale.add_argument("--limit", type=int, default=None, help="with --recompute: use only the first N rows")
    return parser


def _cluster_flags(parser: argparse.ArgumentParser, address: bool = True) -> None:
    """What a verb that runs on Ray needs to know of the cluster."""
    if address:
        parser.add_argument(
            "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)"
        )
    parser.add_argument(
        "--wait-for-resources",
        dest="wait_for_resources",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="how long to wait for the autoscaler to add the GPUs asked for "
        "(default: $VOLDIT_WAIT_FOR_RESOURCES, else 1800)",
    )
    parser.add_argument(
        "--shared-dir",
        dest="shared_dir",
        default=None,
        help="a folder every node of the cluster mounts (EFS, NFS): local --storage/--output under it "
        "are allowed on a multi-node cluster (default: $VOLDIT_SHARED_DIR)",
    )


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
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
        help="ddpm (the paper's, 300 steps), ddim, or dpmpp (DPM-Solver++(2M), for 10-25 steps)",
    )
    parser.add_argument("--steps", "--timesteps", dest="steps", type=int, default=300, help="denoising steps")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic; ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (rows without a seed column)")
    parser.add_argument(
        "--batch-size", "--batch_size", dest="batch_size", type=int, default=4, help="volumes per pass"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "no"],
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


def _export_cluster_flags(args: argparse.Namespace) -> None:
    """The cluster flags travel as the environment variables they default to (read by the runtime)."""
    wait, shared = getattr(args, "wait_for_resources", None), getattr(args, "shared_dir", None)
    if wait is None and not shared:
        return
    import os

    from voldit.distributed.runtime import SHARED_DIR_ENV, WAIT_ENV

    if wait is not None:
        os.environ[WAIT_ENV] = str(wait)
    if shared:
        os.environ[SHARED_DIR_ENV] = shared


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _placement_flags(parser: argparse.ArgumentParser) -> None:
    """How masks meet the model: label maps, unseen labels and the field of view (synthesize and pipeline)."""
    parser.add_argument(
        "--allow-unseen-labels",
        action="store_true",
        help="synthesise from masks with label values the TGCA never saw in training",
    )
    parser.add_argument(
        "--label-map",
        metavar="FILE",
        help='JSON or CSV mapping mask label values onto the training set\'s ("5": 1, or "drop")',
    )
    parser.add_argument(
        "--field-of-view",
        choices=["label", "centre"],
        default="label",
        help="where the model's field of view sits in each mask: the centre of the labelled region "
        "(default) or of the volume",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from voldit.errors import VolditError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # credential lookups at INFO
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    name = args.verb + (f" {args.config_verb}" if args.verb == "config" else "")
    if args.verb == "train" and args.name is None:
        args.name = args.stage
    _export_cluster_flags(args)
    try:
        return _COMMANDS[name](args)
    except VolditError as error:  # what the user can fix: one line, no traceback
        print(f"voldit {name}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
