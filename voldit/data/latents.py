"""Latent datasets: a folder of parquet parts (tensor columns) plus ``dataset.json``.

Each part is written whole under a temporary name and renamed, so a row is either committed in exactly
one part or absent; a re-run encodes only the absent rows. Parts carry the running sums of their latent
values in their schema metadata, so the dataset's scale factor (1 / std of all latent values) is
computed from every part without reading a tensor twice.

Columns: ``id``, ``image`` (source path), ``latent`` (float32 [C, D, H, W]), ``affine`` (the crop's
4 x 4 voxel-to-world matrix, row-major), and per condition key ``<key>`` (int16 [1, X, Y, Z],
preprocessed at image resolution) with ``<key>_path``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from voldit import storage
from voldit.data.nifti import label_values
from voldit.data.preprocess import Grid
from voldit.errors import VolditError
from voldit.qc import add_histograms, reference

INFO_FILE = "dataset.json"
PART_GLOB = "part-*.parquet"
_STATS_KEY = b"voldit.latent_stats"


class LatentDatasetError(VolditError, RuntimeError):
    """A latent folder that is missing, incomplete, or does not fit what is asked of it."""


@dataclass
class LatentDatasetInfo:
    """What training and sampling need to know about a latent dataset, stored beside it."""

    rows: int
    latent_shape: list[int]
    scale_factor: float
    latent_mean: float
    latent_std: float
    roi_size: list[int]
    condition_keys: list[str] = field(default_factory=list)
    # The model grid the crops were taken on (voldit.data.preprocess.Grid); null: as stored.
    spacing: list[float] | None = None
    orientation: str | None = None
    vqgan_checkpoint: str = ""
    labels: dict[str, list[int]] = field(default_factory=dict)  # label values per key, over whole masks
    # HU per label value of each condition key in the real crops (voldit.qc): the quality gate's reference
    hu_reference: dict[str, dict[str, dict]] = field(default_factory=dict)
    created: str = ""
    format: int = 1


def _tensor_column(arrays: Sequence[np.ndarray], dtype) -> pa.Array:
    # C order always: numpy keeps a transposed input's layout, which arrow would record as a permutation.
    stacked = np.ascontiguousarray(np.stack([np.asarray(a, dtype=dtype) for a in arrays]))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(stacked)


def write_part(folder: str | Path, rows: list[dict], condition_keys: Sequence[str] = ()) -> str:
    """Write rows ({id, image, latent, affine, <key>, <key>_path}) as one new part, atomically, into a
    local folder or an ``s3://`` prefix."""
    latents = np.stack([np.asarray(r["latent"], dtype=np.float32) for r in rows])
    columns = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], pa.string()),
        "latent": _tensor_column(latents, np.float32),
        "affine": pa.array(
            [np.asarray(r["affine"], np.float64).reshape(-1).tolist() for r in rows],
            pa.list_(pa.float64(), 16),
        ),
    }
    labels: dict = {}
    histograms: dict = {}  # HU per label, summed over the part's rows (voldit.qc)
    for row in rows:
        for key, per_label in row.get("hu_histograms", {}).items():
            add_histograms(histograms, key, per_label)
    for key in condition_keys:
        columns[key] = _tensor_column([r[key] for r in rows], np.int16)
        columns[f"{key}_path"] = pa.array([r[f"{key}_path"] for r in rows], pa.string())
        # The whole masks' labels where the encoder counted them, else the stored crops'.
        found = (
            r["labels"][key] if "labels" in r else label_values(np.asarray(r[key], np.int16)) for r in rows
        )
        labels[key] = sorted({int(v) for values in found for v in values})
    stats = {
        "count": int(latents.size),
        "sum": float(latents.sum(dtype=np.float64)),
        "sumsq": float(np.square(latents, dtype=np.float64).sum()),
        "labels": labels,
        "hu_histograms": histograms,
    }
    table = pa.table(columns).replace_schema_metadata({_STATS_KEY: json.dumps(stats).encode()})
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    # Staged beside the target when local (then renamed), in the temp folder when remote (then uploaded).
    staging = None if storage.is_remote(folder) else Path(folder)
    if staging is not None:
        staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=staging)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        return storage.put_file(tmp, storage.join(folder, name))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parts(folder: str | Path) -> list[str]:
    """The committed parts of a latent folder (local or remote), sorted."""
    return storage.glob(storage.join(folder, PART_GLOB))


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete half-written parts left by a killed run (local folders; S3 uploads are all or nothing)."""
    if storage.is_remote(folder):
        return 0
    stale = list(Path(folder).glob(".part-*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def committed_ids(folder: str | Path) -> set[str]:
    """Ids of every row already written to a part."""
    ids: set[str] = set()
    fs, _ = storage.filesystem(folder)
    for part in parts(folder):
        ids.update(pq.read_table(_inner(part), columns=["id"], filesystem=fs)["id"].to_pylist())
    return ids


def summarise(
    folder: str | Path, grid: Grid | Sequence[int], condition_keys: Sequence[str], vqgan_checkpoint: str
) -> LatentDatasetInfo:
    """Combine every part's statistics into the dataset's info (and scale factor) and store it; ``grid``
    is the VQ-GAN's (a bare roi_size: stored order and spacing)."""
    grid = Grid.of(grid)
    found = parts(folder)
    if not found:
        raise LatentDatasetError(f"{folder} holds no latent parts: nothing was encoded")
    counts, sums, squares = [], [], []
    rows = 0
    labels: dict[str, set[int]] = {k: set() for k in condition_keys}
    histograms: dict = {}
    shape = None
    fs, _ = storage.filesystem(folder)
    for part in found:
        with fs.open(_inner(part), "rb") as f:
            parquet = pq.ParquetFile(f)
            meta, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
        stats = json.loads(meta.metadata[_STATS_KEY])
        counts.append(stats["count"])
        sums.append(stats["sum"])
        squares.append(stats["sumsq"])
        for key, values in stats.get("labels", {}).items():
            labels.setdefault(key, set()).update(values)
        for key, per_label in stats.get("hu_histograms", {}).items():
            add_histograms(histograms, key, per_label)
        rows += num_rows
        shape = list(meta.field("latent").type.shape)
    # fsum: exact, so the result does not depend on the order the parts were written in.
    count, total, squares_total = math.fsum(counts), math.fsum(sums), math.fsum(squares)
    mean = total / count
    std = math.sqrt(max(squares_total / count - mean**2, 0.0))
    if std == 0:
        raise LatentDatasetError(f"{folder}: every latent value is {mean}; the VQ-GAN output is constant")
    info = LatentDatasetInfo(
        rows=rows,
        latent_shape=shape,
        scale_factor=1.0 / std,
        latent_mean=mean,
        latent_std=std,
        roi_size=list(grid.roi_size),
        condition_keys=list(condition_keys),
        **grid.recorded(),
        vqgan_checkpoint=str(vqgan_checkpoint),
        labels={k: sorted(v) for k, v in labels.items()},
        hu_reference=reference(histograms),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    _store_info(folder, info)
    return info


def _inner(path: str) -> str:
    return storage.filesystem(path)[1]


def _store_info(folder: str | Path, info: LatentDatasetInfo) -> None:
    storage.write_text(storage.join(folder, INFO_FILE), json.dumps(asdict(info), indent=2))


def load_info(folder: str | Path) -> LatentDatasetInfo:
    path = storage.join(folder, INFO_FILE)
    if not storage.exists(path):
        raise LatentDatasetError(
            f"{folder} is not a finished latent dataset ({INFO_FILE} is missing); run `voldit encode` into it"
        )
    return LatentDatasetInfo(**json.loads(storage.read_text(path)))


def read_latents(
    folder: str | Path, columns: Sequence[str] = ("id", "latent"), limit: int | None = None
) -> dict:
    """Read columns of a latent folder into numpy (tensor columns as stacked arrays), for small data."""
    tables = []
    n = 0
    fs, _ = storage.filesystem(folder)
    for part in parts(folder):
        table = pq.read_table(_inner(part), columns=list(columns), filesystem=fs)
        tables.append(table)
        n += table.num_rows
        if limit is not None and n >= limit:
            break
    if not tables:
        raise LatentDatasetError(f"{folder} holds no latent parts")
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    out = {}
    for name in columns:
        column = table[name].combine_chunks()
        out[name] = (
            column.to_numpy_ndarray()
            if isinstance(column.type, pa.FixedShapeTensorType)
            else column.to_pylist()
        )
    return out


def rescale_from_tensors(folder: str | Path, limit: int | None = None) -> LatentDatasetInfo:
    """Recompute the scale factor from the stored latents themselves (the first ``limit`` rows, or all)
    and store it in the dataset's info; the seed's compute_scale_factor, without pasting the result."""
    info = load_info(folder)
    latents = read_latents(folder, ["latent"], limit)["latent"].astype(np.float64)
    info.latent_mean, info.latent_std = float(latents.mean()), float(latents.std())
    if info.latent_std == 0:
        raise LatentDatasetError(f"{folder}: the latents are constant; no scale factor exists")
    info.scale_factor = 1.0 / info.latent_std
    _store_info(folder, info)
    return info
