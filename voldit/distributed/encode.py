"""`voldit encode`: a Ray Data pipeline of encoder actors over a manifest, resumable and idempotent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ray
from tqdm.auto import tqdm

from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.encode import EncodePlan, Encoder, EncodeSummary, finish, plan

__all__ = ["EncodeSummary", "encode"]


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
    run = plan(csv, vqgan, output, condition_keys)
    failed = []
    if len(run.todo):
        failed = _run(run, batch_size, workers, gpus_per_worker, address, progress)
    return finish(run, failed)


def _run(run: EncodePlan, batch_size, workers, gpus, address, progress) -> list[dict]:
    ensure_ray(address)
    require_shared_storage({"--output": run.output})
    require_gpus(gpus, 1)
    records = run.todo[["id", "image", *run.condition_keys]].to_dict("records")
    dataset = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 1000)))
    statuses = dataset.map_batches(
        Encoder,
        fn_constructor_kwargs=dict(
            vqgan_checkpoint=run.vqgan,
            output=run.output,
            condition_keys=run.condition_keys,
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
