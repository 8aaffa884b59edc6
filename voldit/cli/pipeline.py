"""Verbs that run the whole pipeline or judge its output: demo, pipeline, evaluate."""

from __future__ import annotations

import argparse
import sys

from voldit.cli.common import cluster_flags, command, placement_flags
from voldit.config import ConfigError


def add_demo(verbs) -> None:
    demo = verbs.add_parser(
        "demo", help="the whole pipeline on real example CT with the tiny configs, with a report"
    )
    demo.add_argument(
        "--output", default="outputs/demo", help="where data, latents, runs, volumes and the report go"
    )
    demo.add_argument("--cache", default=".cache/examples", help="where the example CTs are kept")
    demo.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every stage")
    demo.add_argument("--no-qc", action="store_true", help="synthesise without the quality gate")


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from voldit.demo import DEFAULT_QC, run_demo

    results = run_demo(args.output, args.cache, overrides=args.set, qc=None if args.no_qc else DEFAULT_QC)
    return _pipeline_status("demo", results)


def add_pipeline(verbs) -> None:
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
    placement_flags(pipe)
    cluster_flags(pipe, address=False)


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


def add_evaluate(verbs) -> None:
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


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from voldit import storage
    from voldit.report import baseline_summary, baseline_table, write_report, yardstick_line
    from voldit.synthesis import Layout, read_run_info

    for what, url in (("--generated", args.generated), ("--real", args.real)):
        storage.check(url, what)  # one clear error for a bad endpoint, credentials or bucket
    vqgan = args.vqgan
    if vqgan is None:  # a `voldit synthesize` folder names its VQ-GAN
        vqgan = (read_run_info(Layout.of(args.generated)) or {}).get("vqgan")
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
