"""A synthesis run seen from its driver, in plain Python: the request checked before any work, the output
folder claimed and its rows planned (to do, finished before, failed before any work), and the summary.
`voldit.distributed.synthesize` runs the planned rows on Ray between the plan and the summary.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from voldit import storage
from voldit.checkpoint import load_checkpoint
from voldit.data.labels import read_label_map
from voldit.data.preprocess import FIELDS_OF_VIEW
from voldit.previews import contact_sheet, save_png
from voldit.qc import parse as qc_parse
from voldit.sampling import SamplingSettings, fingerprint, resolve_vqgan
from voldit.synthesis import (
    Journal,
    Layout,
    SynthesisError,
    manifest_frame,
    plan_rows,
    qc_reference,
    qc_summary,
    read_run_info,
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


@dataclass
class Request:
    """A `voldit synthesize` request that can work: checked and its CSV read, nothing written yet."""

    csv: str | Path
    output: str | Path
    frame: pd.DataFrame  # the CSV's rows (`plan_rows`)
    keys: list[str]  # the TGCA's condition keys: the CSV's mask columns
    settings: SamplingSettings
    qc: dict | None
    run_info: dict  # what the output folder's run.json records, and a later run must match
    synthesizer: dict  # the `Synthesizer` actors' keyword arguments, less where the output is


def check_request(
    csv: str | Path,
    checkpoint: str | Path,
    output: str | Path,
    vqgan: str | Path | None = None,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    allow_unseen_labels: bool = False,
    previews: bool = True,
    qc: dict | None = None,
    field_of_view: str = "label",
    label_map: str | Path | None = None,
) -> Request:
    """Every check that can fail before any work (arguments, storage, checkpoints, the CSV), so that a
    request that cannot work fails at once and writes nothing. The arguments are `synthesize`'s."""
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
    if qc is not None:  # settings that cannot work, a checkpoint with no reference
        try:
            qc_parse(qc)
        except ValueError as error:
            raise SynthesisError(f"quality gate: {error}") from None
        qc_reference(tgca)
    run_info = {
        "checkpoint": checkpoint,
        "checkpoint_id": fingerprint(tgca.path),
        "vqgan": vqgan,
        "vqgan_id": fingerprint(vq.path),
        **settings.recorded(),
        "field_of_view": field_of_view,
        "label_map": {str(k): v for k, v in mapping.items()},
    }
    synthesizer = dict(
        checkpoint=checkpoint,
        vqgan=vqgan,
        settings=asdict(settings),
        allow_unseen_labels=allow_unseen_labels,
        previews=previews,
        qc=qc,
        field_of_view=field_of_view,
        label_map=mapping,
    )
    return Request(csv, output, plan_rows(csv, keys, seed), keys, settings, qc, run_info, synthesizer)


def claim(layout: Layout, request: Request) -> None:
    """Refuse to mix volumes made by other checkpoints or settings into one folder, then record this
    run's in its run.json."""
    info = request.run_info
    previous = read_run_info(layout)
    if previous is not None:
        # Folders made before placements were recorded had masks centre-cropped and unmapped.
        previous = {"field_of_view": "centre", "label_map": {}, **previous}
        keys = [k for k in info if k not in ("checkpoint", "vqgan")]  # the same weights from anywhere
        differ = {k: (previous.get(k), info[k]) for k in keys if previous.get(k) != info[k]}
        if differ:
            shown = ", ".join(f"{k}: {a} before, {b} now" for k, (a, b) in differ.items())
            raise SynthesisError(
                f"{layout.remote or layout.root} holds volumes made with other checkpoints or settings ({shown}); "
                "use another --output, or the same settings to finish that run"
            )
    settings = asdict(request.settings)
    storage.write_text(
        layout.run_info(), json.dumps({**info, "settings": settings, "qc": request.qc}, indent=2)
    )
    layout.publish(layout.run_info())


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


@dataclass
class Plan:
    """A request's output folder, claimed, and its rows: ``todo`` (to synthesise) and ``skipped``
    (finished by an earlier run); the rows that cannot run are already recorded as failed.
    ``finished`` takes each record as the run returns it; ``summary`` ends the run."""

    request: Request
    layout: Layout
    journal: Journal
    todo: pd.DataFrame
    skipped: int
    reused: set[str] = field(default_factory=set)  # rows the actors found finished, the journal did not

    def rows(self) -> list[dict]:
        """The rows to synthesise as the actors take them: id, name, seed and mask paths."""
        return self.todo[["id", "name", "seed", *self.request.keys]].to_dict("records")

    def synthesizer(self) -> dict:
        """The `Synthesizer` actors' keyword arguments: the request's, writing into this folder."""
        return {**self.request.synthesizer, "output": str(self.layout.root), "remote": self.layout.remote}

    def finished(self, record: dict, found: bool) -> None:
        """A row's record as its batch returns; ``found``: an earlier run finished it after its journal
        was last written."""
        self.journal.add(record)
        if found:
            self.reused.add(record["name"])

    def summary(self, elapsed: float | None) -> SynthesisSummary:
        """Write the manifest and the contact sheet and count the run (``elapsed``: its seconds, None
        when nothing ran)."""
        frame, keys = self.request.frame, self.request.keys
        layout, records = self.layout, self.journal.records
        made = [records.get(n, {}) for n in self.todo["name"] if n not in self.reused]
        ok = sum(r.get("status") == "ok" for r in made)
        summary = SynthesisSummary(total=len(frame), skipped=self.skipped + len(self.reused), synthesized=ok)
        summary.volumes_per_hour = ok / elapsed * 3600 if elapsed and ok else None
        manifest = manifest_frame(frame, records, keys)
        if self.request.qc is not None:
            summary.qc = qc_summary([records[n] for n in frame["name"] if n in records])
        summary.manifest = layout.publish(write_manifest(manifest, layout.manifest()))
        summary.failed = manifest[manifest["status"] != "ok"][["id", "status", "error"]].to_dict("records")
        summary.contact_sheet = _contact_sheet(layout, manifest)
        return summary


def _contact_sheet(layout: Layout, manifest: pd.DataFrame) -> str | None:
    """The first SHEET_LIMIT previews side by side, published beside the manifest (None without any)."""
    shown = []
    for row in manifest[manifest["preview"] != ""].head(SHEET_LIMIT).to_dict("records"):
        local = layout.preview(safe_name(row["id"]))
        if not local.is_file():  # written by an actor on another node, or staged and removed
            storage.write_bytes(local, storage.read_bytes(row["preview"]))
        shown.append((row["id"], local))
    if not shown:
        return None
    sheet = layout.publish(save_png(contact_sheet(shown, limit=SHEET_LIMIT), layout.contact_sheet()))
    if layout.remote:
        for _, local in shown:
            local.unlink(missing_ok=True)
    return sheet


def plan(request: Request) -> Plan:
    """Claim the request's output folder and plan its rows from the folder's journal: rows finished
    before are skipped, rows with a problem (`plan_rows`) are recorded as failed without any work."""
    layout = Layout.of(request.output)
    claim(layout, request)
    if removed := layout.remove_temporaries():
        log.info("removed %d half-written file(s) from an interrupted run", removed)
    frame = request.frame
    journal = Journal.open(layout, frame["name"])
    done = journal.done() & set(frame["name"])
    todo = frame[~frame["name"].isin(done) & (frame["problem"] == "")]
    for row in frame[frame["problem"] != ""].to_dict("records"):
        journal.add(write_record(layout, _planned_failure(row, request.keys, row["problem"])))
    log.info("%d rows in %s: %d already synthesised, %d to do", len(frame), request.csv, len(done), len(todo))
    return Plan(request, layout, journal, todo, len(done))
