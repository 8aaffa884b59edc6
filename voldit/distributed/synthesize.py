"""`voldit synthesize`: a Ray Data job of synthesizer actors over a mask CSV, resumable and idempotent."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from tqdm.auto import tqdm

from voldit import storage
from voldit.checkpoint import load_checkpoint
from voldit.data.labels import read_label_map
from voldit.data.preprocess import FIELDS_OF_VIEW
from voldit.distributed.runtime import ensure_ray, require_gpus, require_shared_storage
from voldit.previews import contact_sheet, save_png
from voldit.qc import parse as qc_parse
from voldit.sampling import SamplingSettings, fingerprint, resolve_vqgan
from voldit.synthesis import (
    CONTACT_SHEET,
    MANIFEST,
    RUN_INFO,
    Journal,
    Layout,
    SynthesisError,
    Synthesizer,
    manifest_frame,
    plan_rows,
    qc_reference,
    qc_summary,
    safe_name,
    write_manifest,
    write_record,
)

log = logging.getLogger(__name__)

SHEET_LIMIT = 64  # previews on the contact sheet: only these are fetched from a remote output


@dataclass
class SynthesisSummary:
    total: int
    skipped: int
    synthesized: int
    failed: list[dict] = field(default_factory=list)
    manifest: Path | None = None
    contact_sheet: Path | None = None
    volumes_per_hour: float | None = None
    qc: dict | None = None  # the quality gate's counts (voldit.synthesis.qc_summary), when it ran


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
    if field_of_view not in FIELDS_OF_VIEW:
        raise SynthesisError(f"--field-of-view is {field_of_view!r}; use one of {', '.join(FIELDS_OF_VIEW)}")
    settings = settings or SamplingSettings()
    for url, what in (
        (csv, "mask CSV"),
        (output, "output"),
        (checkpoint, "TGCA checkpoint"),
        (vqgan, "--vqgan"),
        (label_map, "--label-map"),
    ):
        if url:
            storage.check(url, what)  # one clear error before any work: endpoint, credentials, bucket
    mapping = read_label_map(label_map) if label_map else {}
    checkpoint = storage.resolve(checkpoint)
    tgca = load_checkpoint(checkpoint, stage="tgca")  # fail before any work if a checkpoint is wrong
    vq = resolve_vqgan(tgca, vqgan)
    vqgan = storage.resolve(vqgan) if vqgan else tgca.meta.get("vqgan_checkpoint")
    keys = list(tgca.config.tgca.condition_keys)
    if qc is not None:  # before any work: settings that cannot work, a checkpoint with no reference
        try:
            qc_parse(qc)
        except ValueError as error:
            raise SynthesisError(f"quality gate: {error}") from None
        qc_reference(tgca)
    frame = plan_rows(csv, keys, seed)
    ensure_ray(address)
    require_shared_storage({"--output": output})  # before the first file is written
    layout = Layout.of(output)
    placement = {"field_of_view": field_of_view, "label_map": {str(k): v for k, v in mapping.items()}}
    _claim(layout, tgca, vq, settings, checkpoint, vqgan, qc, placement)
    if removed := layout.remove_temporaries():
        log.info("removed %d half-written file(s) from an interrupted run", removed)

    journal = Journal.open(layout, frame["name"])
    done = journal.done() & set(frame["name"])
    todo = frame[~frame["name"].isin(done) & (frame["problem"] == "")]
    summary = SynthesisSummary(total=len(frame), skipped=len(done), synthesized=0)
    for row in frame[frame["problem"] != ""].to_dict("records"):
        journal.add(write_record(layout, _planned_failure(row, keys, row["problem"])))
    log.info("%d rows in %s: %d already synthesised, %d to do", len(frame), csv, summary.skipped, len(todo))
    reused = set()

    def finished(record: dict, found: bool) -> None:
        journal.add(record)
        if found:  # finished by an earlier run that was killed before its journal said so
            reused.add(record["name"])

    try:
        if len(todo):
            synthesizer = dict(
                checkpoint=checkpoint,
                output=str(layout.root),
                vqgan=vqgan,
                remote=layout.remote,
                settings=asdict(settings),
                allow_unseen_labels=allow_unseen_labels,
                previews=previews,
                qc=qc,
                field_of_view=field_of_view,
                label_map=mapping,
            )
            rows = todo[["id", "name", "seed", *keys]].to_dict("records")
            elapsed = _run(rows, synthesizer, batch_size, workers, gpus_per_worker, progress, finished)
            made = [journal.records.get(n, {}) for n in todo["name"] if n not in reused]
            summary.skipped += len(reused)
            summary.synthesized = ok = sum(r.get("status") == "ok" for r in made)
            summary.volumes_per_hour = ok / elapsed * 3600 if elapsed > 0 and ok else None
    finally:
        journal.flush()  # whatever ends the run, the records so far are in the journal
    manifest = manifest_frame(frame, journal.records, keys)
    if qc is not None:
        summary.qc = qc_summary([journal.records[n] for n in frame["name"] if n in journal.records])
    summary.manifest = layout.publish(write_manifest(manifest, layout.root / MANIFEST))
    summary.failed = manifest[manifest["status"] != "ok"][["id", "status", "error"]].to_dict("records")
    shown = []
    for row in manifest[manifest["preview"] != ""].head(SHEET_LIMIT).to_dict("records"):
        local = layout.preview(safe_name(row["id"]))
        if not local.is_file():  # written by an actor on another node, or staged and removed
            storage.write_bytes(local, storage.read_bytes(row["preview"]))
        shown.append((row["id"], local))
    if shown:
        sheet = save_png(contact_sheet(shown, limit=SHEET_LIMIT), layout.root / CONTACT_SHEET)
        summary.contact_sheet = layout.publish(sheet)
        if layout.remote:
            for _, local in shown:
                local.unlink(missing_ok=True)
    return summary


def _claim(
    layout: Layout,
    tgca,
    vq,
    settings: SamplingSettings,
    source: str,
    vq_source: str,
    qc: dict | None,
    placement: dict,
) -> None:
    """Refuse to mix volumes made by other checkpoints or settings into one folder."""
    info = {
        "checkpoint": source,
        "checkpoint_id": fingerprint(tgca.path),
        "vqgan": vq_source,
        "vqgan_id": fingerprint(vq.path),
        **settings.recorded(),
        **placement,
    }
    path = layout.root / RUN_INFO
    remote = layout.url(path) if layout.remote else None
    previous = None
    if remote and storage.exists(remote):
        previous = json.loads(storage.read_text(remote))
    elif path.is_file():
        previous = json.loads(path.read_text())
    if previous is not None:
        # Folders made before placements were recorded had masks centre-cropped and unmapped.
        previous = {"field_of_view": "centre", "label_map": {}, **previous}
        keys = ("checkpoint_id", "vqgan_id", *settings.recorded(), *placement)
        differ = {k: (previous.get(k), info[k]) for k in keys if previous.get(k) != info[k]}
        if differ:
            shown = ", ".join(f"{k}: {a} before, {b} now" for k, (a, b) in differ.items())
            raise SynthesisError(
                f"{layout.remote or layout.root} holds volumes made with other checkpoints or settings ({shown}); "
                "use another --output, or the same settings to finish that run"
            )
    storage.write_text(path, json.dumps({**info, "settings": asdict(settings), "qc": qc}, indent=2))
    layout.publish(path)


def _planned_failure(row: dict, keys: list[str], reason: str) -> dict:
    return {
        "id": row["id"],
        "name": row["name"],
        "masks": {k: row[k] for k in keys},
        "seed": row["seed"],
        "status": "failed",
        "error": reason,
        "seconds": 0.0,
    }


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
