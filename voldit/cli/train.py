"""``voldit train`` (one stage with Ray Train) and ``voldit sweep`` (VolDiT sizes with Ray Tune)."""

from __future__ import annotations

import argparse
import sys

from voldit.cli.common import cluster_flags, command
from voldit.config import load_config


def add_train(verbs) -> None:
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
    cluster_flags(tr)


@command("train")
def _train(args: argparse.Namespace) -> int:
    from voldit.distributed.train import train

    result = train(
        _load(args),
        args.stage,
        args.train,
        args.val,
        dit=args.dit,
        vqgan=args.vqgan,
        name=args.stage if args.name is None else args.name,
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


def _load(args: argparse.Namespace):
    """The config from the positional arguments, where files and key=value overrides may mix, and --set."""
    files = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c] + args.set
    return load_config(*files, overrides=overrides)


def add_sweep(verbs) -> None:
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
    cluster_flags(sw)


@command("sweep")
def _sweep(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from voldit.distributed.sweep import sweep
    from voldit.training.sweeps import parse_grid

    result = sweep(
        OmegaConf.to_container(_load(args), resolve=True),
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
