"""Conditional synthesis, one CT volume per mask row: the rows' plan, the output folder's layout and
per-row records, and the batch callable that Ray actors run (it knows nothing of Ray).

Output folder:

    volumes/<name>.nii.gz     int16 HU on the mask's own grid (its shape, affine and spacing)
    previews/<name>.png       axial, coronal and sagittal mid-slices, and the same with mask outlines
    records/<name>.json       one per finished row (ok or failed): what made it, how long it took
    journal/*.jsonl.gz        (s3:// outputs) the records again, a few objects for all rows: see Journal
    manifest.csv              every row of the CSV, in order, from the records
    contact_sheet.png         the previews side by side
    run.json                  the checkpoints and settings every volume in the folder was made with

Every file is written under a temporary name and renamed when complete, so a killed job leaves
nothing half-written under a final name; the record is written last, so a row with a record is done.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from voldit import storage
from voldit.checkpoint import Checkpoint
from voldit.data.intensity import unit_to_hu, unit_to_hu_int16
from voldit.data.labels import apply_label_map
from voldit.data.manifest import read_manifest
from voldit.data.nifti import (
    VolumeError,
    check_same_grid,
    label_values,
    mask_labels,
    read_volume,
    write_volume,
)
from voldit.data.preprocess import PreparedCondition, prepare_condition
from voldit.data.workers import io_workers, load_rows
from voldit.errors import VolditError
from voldit.previews import preview, save_png
from voldit.qc import parse as qc_parse
from voldit.qc import score as qc_score
from voldit.sampling import Pipeline, SamplingSettings, seed_for

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
RUN_INFO = "run.json"
CONTACT_SHEET = "contact_sheet.png"
JOURNAL = "journal"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


FINISHED = ("ok", "qc_failed")  # final statuses: a resumed run does not redo these rows


class SynthesisError(VolditError, RuntimeError):
    """A synthesis job that cannot start as asked; nothing has been written."""


def safe_name(row_id: str) -> str:
    """A file name made from a row id that cannot leave the output folder.

    Path separators, `.` and `..` components and unusual characters are removed; an id that had to be
    changed gets a short hash of the original, so two ids never map to one name by accident.
    """
    parts = [p for p in re.split(r"[\\/]+", row_id) if p not in ("", ".", "..")]
    name = _UNSAFE.sub("_", "_".join(parts)).strip("._")[:100]
    if name != row_id:
        name = f"{name or 'row'}-{hashlib.sha256(row_id.encode()).hexdigest()[:8]}"
    return name


@dataclass(frozen=True)
class Layout:
    """Where each of a row's files goes in an output folder. With a ``remote`` (s3://) output, files are
    written under ``root``, a staging folder on this machine's own disk, and uploaded (then removed) as
    each is completed; every node stages under its own cache, so nothing depends on a shared disk."""

    root: Path
    remote: str | None = None

    @classmethod
    def of(cls, output: str | Path) -> Layout:
        """The layout of ``output``: a local folder, or an s3:// prefix staged under this node's cache."""
        if not storage.is_remote(output):
            return cls(Path(output).resolve())
        remote = str(output).rstrip("/")
        return cls(storage.staging_dir("synthesize", remote), remote)

    def url(self, path: Path) -> str:
        """Where a file under ``root`` lives in the output (its URL for a remote output)."""
        if not self.remote:
            return str(path)
        return storage.join(self.remote, Path(path).relative_to(self.root).as_posix())

    def publish(self, path: Path, keep: bool = True) -> str:
        """Upload a completed file to the remote output (its URL), or return its local path. A remote
        output's staging copy is removed unless ``keep``."""
        path = Path(path)
        if not self.remote:
            return str(path)
        dest = storage.upload(path, self.url(path))
        if not keep:
            path.unlink()
        return dest

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / f"{name}.nii.gz"

    def preview(self, name: str) -> Path:
        return self.root / "previews" / f"{name}.png"

    def record(self, name: str) -> Path:
        return self.root / "records" / f"{name}.json"

    def manifest(self) -> Path:
        return self.root / MANIFEST

    def run_info(self) -> Path:
        return self.root / RUN_INFO

    def contact_sheet(self) -> Path:
        return self.root / CONTACT_SHEET

    def finished(self, rows: list[dict]) -> dict[str, dict]:
        """The rows among ``rows`` (dicts with a ``name``) whose ok record is already in the remote output, by
        name: rows a killed driver finished after its journal's last part. One concurrent fetch."""
        if not self.remote or not rows:
            return {}
        out = {}
        for data in storage.read_many([self.url(self.record(r["name"])) for r in rows]).values():
            try:
                record = json.loads(data)
            except json.JSONDecodeError:
                continue
            if record.get("status") in FINISHED:
                out[record["name"]] = record
        return out

    def remove_temporaries(self) -> int:
        """Delete files a killed run left half-written (hidden temporaries); returns how many."""
        stale = [p for sub in ("volumes", "previews", "records") for p in (self.root / sub).glob(".*")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


class Journal:
    """The records of an output's finished rows (ok or failed), by name: what a resumed run plans from.

    A local output's journal is its per-row records. A remote output's is a few objects, not one per
    row: the driver adds each record the actors return and writes them as one part
    (``journal/<time>.jsonl.gz``) every ``flush_rows`` records or ``flush_seconds``, and when the run ends
    however it ends; opening the journal merges its parts into one. Planning a resumed run of 100,000
    rows is then one listing and a request per part. Rows a killed driver finished after its last part
    are not lost: their records are in ``records/``, and the actor that gets such a row again finds it
    there (`Layout.finished`) instead of redoing it.
    """

    def __init__(self, layout: Layout, records: dict[str, dict], parts: list[str]) -> None:
        self.layout, self.records, self.parts = layout, records, parts
        self.flush_rows, self.flush_seconds = 1000, 600.0
        self._pending: list[dict] = []
        self._flushed = time.monotonic()

    @classmethod
    def open(cls, layout: Layout, names) -> Journal:
        """The journal of ``layout``'s rows ``names``; a remote one's parts are merged into one."""
        if not layout.remote:
            return cls(layout, {n: r for n in set(names) if (r := read_record(layout, n)) is not None}, [])
        fs, inner = storage.filesystem(storage.join(layout.remote, JOURNAL))
        try:
            parts = sorted(p for p in fs.ls(inner, detail=False) if p.endswith(".jsonl.gz"))
        except FileNotFoundError:
            parts = []
        records: dict[str, dict] = {}
        contents = fs.cat(parts) if parts else {}
        for part in parts:  # in time order: a row's later record replaces its earlier one
            for line in gzip.decompress(contents[part]).splitlines():
                record = json.loads(line)
                records[record["name"]] = record
        journal = cls(layout, records, [storage.join(layout.remote, JOURNAL, Path(p).name) for p in parts])
        if len(parts) > 1:
            journal._write(list(records.values()))
            for old in journal.parts[:-1]:
                storage.remove(old)
            journal.parts = journal.parts[-1:]
        return journal

    def done(self) -> set[str]:
        """The rows finished (ok, or failed the quality gate after its retries; a local output's volume is
        checked too): what a run skips."""
        if not self.layout.remote:
            return {n for n, r in self.records.items() if is_complete(self.layout, r)}
        return {n for n, r in self.records.items() if r.get("status") in FINISHED}

    def add(self, record: dict) -> None:
        """A finished row's record (already written to ``records/`` by whoever finished it)."""
        self.records[record["name"]] = record
        if not self.layout.remote:
            return
        self._pending.append(record)
        if len(self._pending) >= self.flush_rows or time.monotonic() - self._flushed >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the records added since the last part as a new part."""
        if self._pending:
            self._write(self._pending)
        self._pending, self._flushed = [], time.monotonic()

    def _write(self, records: list[dict]) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        url = storage.join(self.layout.remote, JOURNAL, f"{stamp}.jsonl.gz")
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        self.parts.append(storage.write_bytes(url, gzip.compress(data, compresslevel=3)))


def write_record(layout: Layout, record: dict) -> dict:
    """Write a row's record (last of its files) and return it."""
    path = layout.record(record["name"])
    storage.write_text(path, json.dumps(record, indent=1))
    layout.publish(path, keep=False)
    return record


def read_record(layout: Layout, name: str) -> dict | None:
    path = layout.record(name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def read_run_info(layout: Layout) -> dict | None:
    """The checkpoints and settings an output folder's volumes were made with (its remote copy first),
    or None when nothing was made there yet."""
    path = layout.run_info()
    remote = layout.url(path) if layout.remote else None
    if remote and storage.exists(remote):
        return json.loads(storage.read_text(remote))
    if path.is_file():
        return json.loads(path.read_text())
    return None


def read_outputs(output: str | Path) -> tuple[pd.DataFrame, list[str]] | None:
    """A synthesis output folder's (local or s3://) rows that have a volume (ok or failed the quality
    gate), from its manifest, and its condition keys; None when ``output`` has no manifest."""
    layout = Layout.of(output)
    url = layout.url(layout.manifest())
    if not storage.exists(url):
        return None
    frame = pd.read_csv(io.BytesIO(storage.read_bytes(url)), dtype=str, keep_default_na=False)
    keys = frame.columns[1 : frame.columns.get_loc("output")].tolist()  # `manifest_frame`'s column order
    return frame[frame["status"].isin(FINISHED)], keys


def is_complete(layout: Layout, record: dict | None) -> bool:
    """A row of a local output is done when its record says ok and its volume is there with the
    recorded shape."""
    if not record or record.get("status") not in FINISHED:
        return False
    path = layout.volume(record["name"])
    try:
        return list(nib.load(path).shape) == record["shape"]
    except (OSError, nib.filebasedimages.ImageFileError, EOFError):
        return False


def plan_rows(csv: str | Path, condition_keys: list[str], base_seed: int = 0) -> pd.DataFrame:
    """The CSV's rows with ``id``, ``name`` (safe file name), ``seed`` and ``problem`` (a reason the row
    cannot run, found before any work: a bad seed or a name taken by an earlier row).

    Missing or unreadable mask files are not problems here: they are found and recorded per row.
    A ``seed`` column gives each row's seed; without one, seeds derive from the ids and ``base_seed``.
    """
    frame = read_manifest(csv, condition_keys, check_files=False, unique=None)
    if frame["id"].duplicated().any():
        dupes = sorted(set(frame["id"][frame["id"].duplicated()]))[:5]
        raise SynthesisError(f"{csv}: the id column has duplicates ({dupes}); ids name the outputs")
    frame["name"] = frame["id"].map(safe_name)
    problems = [""] * len(frame)
    seeds = []
    for i, row in enumerate(frame.to_dict("records")):
        raw = str(row.get("seed", "")).strip()
        if raw:
            try:
                seeds.append(int(raw))
            except ValueError:
                seeds.append(-1)
                problems[i] = f"seed {raw!r} is not an integer"
        else:
            seeds.append(seed_for(row["id"], base_seed))
    frame["seed"] = seeds
    taken = frame["name"].duplicated(keep="first")
    for i in np.flatnonzero(taken.to_numpy()):
        problems[i] = problems[i] or f"its output name {frame['name'][i]!r} is taken by an earlier row"
    frame["problem"] = problems
    return frame


def qc_reference(checkpoint: Checkpoint) -> dict:
    """The quality gate's reference (voldit.qc) for a TGCA checkpoint's first condition key."""
    key = checkpoint.config.tgca.condition_keys[0]
    ref = (checkpoint.meta.get("hu_reference") or {}).get(key)
    if not ref:
        raise SynthesisError(
            f"{checkpoint.path} has no HU reference for {key!r} (its latents were encoded before voldit "
            "recorded one): re-encode the training set and train the TGCA again, or run without --qc"
        )
    return ref


class Synthesizer:
    """Batch of rows {id, name, seed, <condition key>: mask path} -> volumes, previews and records;
    returns one status per row. A row whose ok record is already in a remote output is not redone.

    Loads the TGCA and VQ-GAN once (an actor's lifetime), samples every readable row of the batch in one
    denoising pass, then decodes and writes each volume on its mask's grid. Unreadable or unusable masks
    are recorded as failed with their reason; the other rows still run.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        output: str | Path,
        vqgan: str | Path | None = None,
        settings: dict | None = None,
        allow_unseen_labels: bool = False,
        previews: bool = True,
        device: str | None = None,
        remote: str | None = None,
        qc: dict | None = None,
        field_of_view: str = "label",
        label_map: dict[int, int] | None = None,
    ) -> None:
        self.settings = SamplingSettings(**(settings or {}))
        self.pipeline = Pipeline(checkpoint, vqgan, self.settings, device, stage="tgca")
        # The quality gate ({min_voxels, min_inside, retries}), checked on the first condition key's labels.
        self.qc, self.qc_retries = qc_parse(qc) if qc is not None else (None, 0)
        self.qc_reference = qc_reference(self.pipeline.checkpoint) if qc is not None else {}
        # A remote output is staged under this node's own cache, wherever the driver staged its files.
        self.layout = Layout.of(remote) if remote else Layout(Path(output))
        self.allow_unseen_labels = allow_unseen_labels
        self.field_of_view = field_of_view  # "label" (centre of the labelled region) or "centre"
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}  # other label sets -> ours
        self.previews = previews
        self._workers = io_workers()  # masks read and volumes written beside the GPU

    def _masks(self, row: dict) -> tuple[PreparedCondition, np.ndarray]:
        masks = {}
        for key in self.pipeline.condition_keys:
            path = row[key]
            mask = read_volume(path, dtype=None)  # as stored: label maps are small integers, counted fast
            mask.array = apply_label_map(mask_labels(mask, f"{key} {path}"), self.label_map)
            values = label_values(mask.array)
            if not values.any():
                raise VolumeError(f"{key} {path}: the mask is empty (no labelled voxel)")
            trained = self.pipeline.condition_labels.get(key)
            unseen = sorted(set(values.tolist()) - set(trained or []))
            if trained is not None and unseen and not self.allow_unseen_labels:
                raise VolumeError(
                    f"{key} {path}: label value(s) {unseen[:10]}{' ...' if len(unseen) > 10 else ''} were "
                    f"never in the training masks (trained on {len(trained)} values: {_ranges(trained)}); map "
                    "them onto those with --label-map FILE, or pass --allow-unseen-labels to synthesise anyway"
                )
            if masks:
                first = next(iter(masks.values()))
                check_same_grid(first, mask, f"{row['id']}: {key}")
            masks[key] = mask
        prepared = prepare_condition(masks, self.pipeline.grid, self.field_of_view)
        if not prepared.condition.any():
            view = prepared.field_of_view
            raise VolumeError(
                f"{row['id']}: no labelled voxel inside the model's field of view "
                f"({'x'.join(map(str, self.pipeline.roi_size))} voxels of the model's grid, voxels "
                f"{view['voxels']} of the mask); is the mask empty after resampling, or use --field-of-view label"
            )
        first = next(iter(masks.values()))
        return prepared, first.array  # integer labels, for the preview's outlines

    def _record(self, row: dict, **fields) -> dict:
        p = self.pipeline
        record = {
            "id": row["id"],
            "name": row["name"],
            "masks": {k: row[k] for k in p.condition_keys},
            "output": "",
            "preview": "",
            "seed": int(row["seed"]),
            **self.settings.recorded(),
            "checkpoint": str(p.checkpoint.path),
            "checkpoint_id": p.ids["checkpoint"],
            "vqgan": str(p.vqgan_checkpoint.path),
            "vqgan_id": p.ids["vqgan"],
            "status": "ok",
            "error": "",
            "seconds": 0.0,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        record.update(fields)
        return record

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        start = time.perf_counter()
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        results = {r["id"]: "" for r in rows}
        found = self.layout.finished(rows)  # finished by a killed run after its journal's last part
        records = {r["id"]: found[r["name"]] for r in rows if r["name"] in found}
        ready = []
        todo = [r for r in rows if r["id"] not in records]
        for row, prepared, error in load_rows(self._workers, self._masks, todo):  # read in parallel
            if error:
                results[row["id"]] = error
            else:
                ready.append((row, *prepared))
        attempts: dict[str, list[dict]] = {}  # quality-gate attempts that failed, by row id
        while ready:
            try:
                made = self._generate(ready, start, attempts)
            except Exception as error:  # noqa: BLE001 - one failing batch must not end the job
                log.exception("batch of %d rows failed", len(ready))
                for row, *_ in ready:
                    results[row["id"]] = f"synthesis failed: {type(error).__name__}: {error}"
                break
            retry = []
            for row, *prepared in ready:
                if "retry" in made[row["id"]]:  # failed the gate: again with the next seed
                    attempts.setdefault(row["id"], []).append(made[row["id"]]["retry"])
                    retry.append(({**row, "seed": int(row["seed"]) + 1}, *prepared))
                else:
                    records[row["id"]] = made[row["id"]]
            ready = retry
        seconds = (time.perf_counter() - start) / max(1, len(todo))
        for row in todo:
            if row["id"] in records and records[row["id"]]["status"] not in FINISHED:
                results[row["id"]] = records[row["id"]]["error"]
            if results[row["id"]]:
                failed = self._record(row, status="failed", error=results[row["id"]], seconds=seconds)
                records[row["id"]] = write_record(self.layout, failed)
        # The records go back to the driver too: it builds the manifest without reading the output.
        return {
            "id": [r["id"] for r in rows],
            "error": [results[r["id"]] for r in rows],
            "seconds": [records[r["id"]].get("seconds", 0.0) for r in rows],
            "record": [json.dumps(records[r["id"]]) for r in rows],
            "reused": [r["name"] in found for r in rows],
        }

    def _generate(self, ready: list, start: float, attempts: dict[str, list[dict]]) -> dict[str, dict]:
        """Sample the batch, then decode each volume on the device while a thread pool puts the decoded
        ones back on their masks' grids and writes them (CPU work that would otherwise leave the GPU
        idle). Returns each row's record; rows that failed after sampling have status failed (their
        record not yet written), rows to sample again for the quality gate {"retry": this attempt}."""
        condition = torch.stack([prepared.condition for _, prepared, _ in ready])  # (B, K, *roi_size)
        latents = self.pipeline.sample_latents([int(row["seed"]) for row, *_ in ready], condition)
        share = (time.perf_counter() - start) / len(ready)
        jobs, stopped = {}, None
        for (row, prepared, mask), latent in zip(ready, latents, strict=True):
            began = time.perf_counter()
            try:
                image = self.pipeline.decode(latent[None])[0]  # (*roi_size) in [-1, 1]
            except Exception as error:  # noqa: BLE001 - the volumes already decoded are still written
                log.exception("decoding failed at row %s", row["id"])
                stopped = f"synthesis failed: {type(error).__name__}: {error}"
                break
            earlier = attempts.get(row["id"], [])
            jobs[row["id"]] = self._workers.submit(
                self._write, row, prepared, mask, image, share, began, earlier
            )
        out = {
            row["id"]: self._record(row, status="failed", error=stopped)
            for row, *_ in ready
            if stopped and row["id"] not in jobs
        }
        rows = {row["id"]: row for row, *_ in ready}
        for row_id, job in jobs.items():  # every write ends before the batch returns
            try:
                out[row_id] = job.result()
            except Exception as error:  # noqa: BLE001 - one unwritable volume must not fail its batch
                log.exception("row %s failed after sampling", row_id)
                reason = f"writing failed: {type(error).__name__}: {error}"
                out[row_id] = self._record(rows[row_id], status="failed", error=reason)
        return out

    def _check(self, row, prepared: PreparedCondition, image: torch.Tensor) -> dict:
        """The quality gate on the model's field of view (where the reference was measured): one attempt."""
        labels = prepared.condition[0].round().to(torch.int64).numpy()  # the first condition key's labels
        result = qc_score(unit_to_hu(image.float().cpu()).numpy(), labels, self.qc_reference, self.qc)
        judged = {str(k): v for k, v in result["labels"].items() if v["passed"] is not None}
        return {
            "seed": int(row["seed"]),
            "passed": result["passed"],
            "failed": result["failed"],
            "labels": judged,
        }

    def _write(
        self, row, prepared, mask: np.ndarray, image: torch.Tensor, share: float, began: float, earlier
    ) -> dict:
        fields = {}
        if self.qc is not None:
            attempt = self._check(row, prepared, image)
            if not attempt["passed"] and len(earlier) < self.qc_retries:
                return {"retry": attempt}  # nothing written: the row is sampled again
            fields["qc"] = [*earlier, attempt]
            if not attempt["passed"]:
                tries, failed = len(earlier) + 1, attempt["failed"]
                reasons = "; ".join(failed[:3]) + (
                    f"; {len(failed) - 3} more label(s)" if len(failed) > 3 else ""
                )
                fields.update(status="qc_failed", error=f"quality gate failed {tries} time(s): {reasons}")
        hu = unit_to_hu_int16(prepared.restore(image))  # back on the mask's grid
        volume = write_volume(self.layout.volume(row["name"]), hu, prepared.source_affine)
        volume = self.layout.publish(volume, keep=False)  # remote: the staging copy is not kept
        try:
            shown = ""
            if self.previews:
                picture = preview(hu, prepared.source_affine, mask, title=row["name"])
                shown = self.layout.publish(save_png(picture, self.layout.preview(row["name"])), keep=False)
            view = prepared.field_of_view
            if view["cut"] > 0:
                fields["warning"] = (
                    f"{view['cut']:.1%} of the labelled voxels lie outside the model's field of view (voxels "
                    f"{view['voxels']} of the mask): synthesised for the part in view"
                )
            record = self._record(
                row,
                output=volume,
                preview=shown,
                shape=list(hu.shape),
                seconds=share + time.perf_counter() - began,
                field_of_view=view,
                **fields,
            )
            return write_record(self.layout, record)
        except BaseException:
            storage.remove(volume)  # a volume without its ok record must not count as done
            raise


def _ranges(values: list[int]) -> str:
    """Sorted integers as runs: [1, 2, 3, 5, 7, 8] -> "1-3, 5, 7-8"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def manifest_frame(frame: pd.DataFrame, records: dict[str, dict], condition_keys: list[str]) -> pd.DataFrame:
    """One manifest row per CSV row, in CSV order, from the records by name (rows without one: not run)."""
    columns = [
        "id",
        *condition_keys,
        "output",
        "preview",
        "seed",
        "sampler",
        "steps",
        "eta",
        "guidance",
        "checkpoint_id",
        "vqgan_id",
        "status",
        "error",
        "warning",
        "seconds",
        "attempts",
    ]
    out = []
    for row in frame.to_dict("records"):
        record = records.get(row["name"]) or {}
        line = {c: record.get(c, "") for c in columns}
        line.update(
            {"id": row["id"], "seed": record.get("seed", row["seed"]), **{k: row[k] for k in condition_keys}}
        )
        line["status"] = record.get("status", "not run")
        line["attempts"] = len(record["qc"]) if record.get("qc") else ""  # quality-gate samplings
        out.append(line)
    return pd.DataFrame(out, columns=columns)


def qc_summary(records: list[dict]) -> dict:
    """The quality gate over a run's records: rows that passed at the first sampling, after retries, or
    not at all, and how often each label failed an attempt (most first)."""
    gated = [r for r in records if r.get("qc")]
    failures: dict[str, int] = {}
    for record in gated:
        for attempt in record["qc"]:
            for label, entry in attempt["labels"].items():
                failures[label] = failures.get(label, 0) + (entry["passed"] is False)
    return {
        "rows": len(gated),
        "first_try": sum(r["qc"][0]["passed"] for r in gated),
        "after_retries": sum(len(r["qc"]) > 1 and r["qc"][-1]["passed"] for r in gated),
        "failed": sum(not r["qc"][-1]["passed"] for r in gated),
        "label_failures": dict(sorted(((k, v) for k, v in failures.items() if v), key=lambda kv: -kv[1])),
    }


def qc_line(summary: dict) -> str:
    """`qc_summary` in one line, as the command line and the pipeline print it."""
    worst = ", ".join(f"label {k} x{v}" for k, v in list(summary["label_failures"].items())[:5]) or "none"
    return (
        f"quality gate: {summary['first_try']} of {summary['rows']} passed at the first sampling, "
        f"{summary['after_retries']} after retries, {summary['failed']} failed; labels failing most: {worst}"
    )


def write_manifest(frame: pd.DataFrame, path: Path) -> Path:
    storage.write_text(path, frame.to_csv(index=False))
    return path
