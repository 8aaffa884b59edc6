"""The ``voldit`` command line: one verb per task."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from voldit.cli import config, data, generate, pipeline, train
from voldit.cli.common import _COMMANDS, export_cluster_flags

# Each adds one verb's subparser and flags (the handler sits beside it); `voldit --help` lists them
# in this order.
VERBS = (
    config.add_info,
    config.add_config,
    config.add_import_reference,
    data.add_encode,
    train.add_train,
    train.add_sweep,
    pipeline.add_demo,
    pipeline.add_pipeline,
    generate.add_sample,
    generate.add_synthesize,
    pipeline.add_evaluate,
    config.add_scale_factor,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voldit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from voldit.errors import VolditError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec"):  # credential lookups at INFO
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    name = args.verb + (f" {args.config_verb}" if args.verb == "config" else "")
    export_cluster_flags(args)
    try:
        return _COMMANDS[name](args)
    except VolditError as error:  # what the user can fix: one line, no traceback
        print(f"voldit {name}: error: {error}", file=sys.stderr)
        return error.exit_code
