"""`voldit encode`: a Ray Data pipeline of encoder actors over a manifest, resumable and idempotent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import ray
from tqdm.auto import tqdm

from voldit import storage
from voldit.checkpoint import load_checkpoint
from voldit.data.latents import LatentDatasetInfo, committed_ids, remove_stale_temporaries, summarise
from voldit.data.manifest import read_manifest
from voldit.data.preprocess import Grid
from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.encode import Encoder

log = logging.getLogger(__name__)

ERRORS_FILE = "errors.csv"


@dataclass
class EncodeSummary:
    total: int
    skipped: int
    encoded: int
    failed: list[dict] = field(default_factory=list)
    info: LatentDatasetInfo | None = None


def encode(
    csv: str | Path,
    vqgan: str | Path,
    output: str | Path,
    condition_keys: Sequence[str] = (),
    batch_size: int = 1,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    progress: bool = True,
) -> EncodeSummary:
    """Encode every manifest row not yet in ``output``; record unreadable rows in ``output/errors.csv``.

    Rows travel as paths; each encoder actor loads the VQ-GAN once, reads its rows' files, and commits
    each batch as one parquet part. The scale factor is then computed over all parts.
    """
    for url, what in ((csv, "manifest"), (output, "output"), (vqgan, "VQ-GAN checkpoint")):
        storage.check(url, what)  # one clear error before any work: endpoint, credentials, bucket
    output = storage.resolve(output)
    vqgan = storage.resolve(vqgan)
    vq = load_checkpoint(vqgan, stage="vqgan")  # fail before any work if the checkpoint is wrong
    grid = Grid.of(vq.config)  # the VQ-GAN's roi_size, spacing and orientation
    frame = read_manifest(csv, ["image", *condition_keys], check_files=False)
    if removed := remove_stale_temporaries(output):
        log.info("removed %d half-written part(s) from an interrupted run", removed)
    done = committed_ids(output)
    todo = frame[~frame["id"].isin(done)]
    summary = EncodeSummary(total=len(frame), skipped=len(frame) - len(todo), encoded=0)
    log.info("%d rows in %s: %d already encoded, %d to do", len(frame), csv, summary.skipped, len(todo))
    if len(todo):
        summary.failed = _run(
            todo,
            vqgan,
            output,
            condition_keys,
            batch_size,
            workers,
            gpus_per_worker,
            address,
            progress,
        )
        summary.encoded = len(todo) - len(summary.failed)
    errors = storage.join(output, ERRORS_FILE)
    if summary.failed:
        storage.write_text(errors, pd.DataFrame(summary.failed).to_csv(index=False))
    elif storage.exists(errors):
        storage.remove(errors)
    if summary.encoded or summary.skipped:
        summary.info = summarise(output, grid, condition_keys, vqgan)
    return summary


def _run(todo, vqgan, output, condition_keys, batch_size, workers, gpus, address, progress):
    ensure_ray(address)
    require_shared_storage({"--output": output})
    require_gpus(gpus, 1)
    records = todo[["id", "image", *condition_keys]].to_dict("records")
    dataset = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 1000)))
    statuses = dataset.map_batches(
        Encoder,
        fn_constructor_kwargs=dict(
            vqgan_checkpoint=vqgan,
            output=output,
            condition_keys=list(condition_keys),
        ),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
        num_gpus=gpus,
        num_cpus=1,
    )
    failed = []
    with tqdm(total=len(records), desc="encode", unit="vol", disable=not progress) as bar:
        for row in statuses.iter_rows():
            if row["error"]:
                failed.append({"id": row["id"], "path": row["image"], "reason": row["error"]})
            bar.update(1)
            bar.set_postfix(failed=len(failed), s_per_vol=f"{row['seconds']:.2f}")
    return failed
