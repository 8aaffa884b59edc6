"""Verbs that read configs, checkpoints and latent datasets without training: info, config validate
and show, import-reference, scale-factor."""

from __future__ import annotations

import argparse
import json

from voldit.cli.common import command
from voldit.config import ConfigError, load_config, stage_of, to_yaml


def add_info(verbs) -> None:
    info = verbs.add_parser("info", help="parameters, tokens and forward FLOPs of a config's model")
    info.add_argument(
        "config", nargs="+", help="config YAML(s), merged left to right (e.g. a DiT and a TGCA config)"
    )
    info.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    info.add_argument("--json", action="store_true", help="print JSON")


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


def _fmt(n: float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:.4g}"


def add_config(verbs) -> None:
    config = verbs.add_parser("config", help="validate or show configs")
    config_verbs = config.add_subparsers(dest="config_verb", required=True, metavar="ACTION")
    validate = config_verbs.add_parser("validate", help="check config files against the schema")
    validate.add_argument("files", nargs="+")
    show = config_verbs.add_parser("show", help="print the resolved config (all defaults when no file)")
    show.add_argument("files", nargs="*")
    show.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")


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


def add_import_reference(verbs) -> None:
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


@command("import-reference")
def _import_reference(args: argparse.Namespace) -> int:
    from voldit.reference import import_reference

    cfg = load_config(*args.config)
    path = import_reference(args.checkpoint, cfg, args.output, scale_factor=args.scale_factor)
    print(f"imported {args.checkpoint} -> {path}")
    return 0


def add_scale_factor(verbs) -> None:
    scale = verbs.add_parser(
        "scale-factor", help="show, or recompute from the tensors, a latent dataset's scale factor"
    )
    scale.add_argument("latents", help="latent dataset folder")
    scale.add_argument("--recompute", action="store_true", help="recompute from the stored latents")
    scale.add_argument("--limit", type=int, default=None, help="with --recompute: use only the first N rows")


@command("scale-factor")
def _scale_factor(args: argparse.Namespace) -> int:
    from voldit.data.latents import load_info, rescale_from_tensors

    info = rescale_from_tensors(args.latents, args.limit) if args.recompute else load_info(args.latents)
    print(
        f"scale_factor {info.scale_factor:.6f} (latent std {info.latent_std:.6f}, mean {info.latent_mean:.6f})"
    )
    return 0
