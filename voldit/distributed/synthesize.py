"""`voldit synthesize`: a Ray Data job of synthesizer actors over a mask CSV, resumable and idempotent.

The run is planned and summarised in plain Python (`voldit.synthesis_plan`); only the rows' fan-out over
actors is Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
from tqdm.auto import tqdm

from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.sampling import SamplingSettings
from voldit.synthesis import Synthesizer
from voldit.synthesis_plan import SynthesisSummary, check_request, plan


def synthesize(
    csv: str | Path,
    checkpoint: str | Path,
    output: str | Path,
    vqgan: str | Path | None = None,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    batch_size: int = 4,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    allow_unseen_labels: bool = False,
    previews: bool = True,
    address: str | None = None,
    progress: bool = True,
    qc: dict | None = None,
    field_of_view: str = "label",
    label_map: str | Path | None = None,
) -> SynthesisSummary:
    """Synthesise one volume per CSV row that has none yet in ``output``; see `voldit.synthesis`.

    Rows travel as paths and seeds; each actor loads the models once and samples ``batch_size`` masks
    per denoising pass. Rows that fail are recorded with their reason and the others still run. With
    ``qc`` ({min_voxels, min_inside, retries}; see `voldit.qc`) each volume passes the quality gate or is
    sampled again with the next seed, up to ``retries`` times. Each mask is brought onto the model's grid
    with its ``field_of_view`` placed at the centre of its "label"led region (or the volume's "centre"),
    its values first mapped by the ``label_map`` file (`voldit.data.labels`), and each volume is put back
    on its mask's own grid.
    """
    request = check_request(
        csv,
        checkpoint,
        output,
        vqgan=vqgan,
        settings=settings,
        seed=seed,
        allow_unseen_labels=allow_unseen_labels,
        previews=previews,
        qc=qc,
        field_of_view=field_of_view,
        label_map=label_map,
    )
    ensure_ray(address)
    require_shared_storage({"--output": output})  # before the first file is written
    run = plan(request)
    elapsed = None
    try:
        if len(run.todo):
            elapsed = _run(
                run.rows(), run.synthesizer(), batch_size, workers, gpus_per_worker, progress, run.finished
            )
    finally:
        run.journal.flush()  # whatever ends the run, the records so far are in the journal
    return run.summary(elapsed)


def _run(rows, synthesizer: dict, batch_size, workers, gpus, progress, finished) -> float:
    """Fan the rows out over `Synthesizer` actors (built with ``synthesizer``), calling
    ``finished(record, found)`` for each row as its batch returns (``found``: it was already done);
    returns the seconds taken."""
    require_gpus(gpus, 1)
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000)))
    statuses = dataset.map_batches(
        Synthesizer,
        fn_constructor_kwargs=synthesizer,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
        num_gpus=gpus,
        num_cpus=1,
    )
    start, failed = time.perf_counter(), 0
    with tqdm(total=len(rows), desc="synthesize", unit="vol", disable=not progress) as bar:
        for row in statuses.iter_rows():
            record = json.loads(row["record"])
            finished(record, bool(row["reused"]))
            failed += record["status"] != "ok"
            bar.update(1)
            bar.set_postfix(failed=failed, s_per_vol=f"{row['seconds']:.1f}")
    return time.perf_counter() - start
