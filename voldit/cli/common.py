"""What several verbs share: the registry `main` dispatches through, and the flags for Ray clusters
and for placing masks."""

from __future__ import annotations

import argparse
from collections.abc import Callable

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register a handler under the name `main` looks up: the verb, or "config ACTION"."""

    def register(fn):
        _COMMANDS[name] = fn
        return fn

    return register


def cluster_flags(parser: argparse.ArgumentParser, address: bool = True) -> None:
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def export_cluster_flags(args: argparse.Namespace) -> None:
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


def placement_flags(parser: argparse.ArgumentParser) -> None:
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
