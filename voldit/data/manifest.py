"""Manifests: the seed's CSV files (an ``image`` column, plus one column per condition key), validated up front."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from voldit import storage
from voldit.errors import VolditError


class ManifestError(VolditError, ValueError):
    """A manifest that cannot be used as it is; the message lists every problem with its row number."""


def _exists(path: str) -> bool:
    fs, inner = storage.filesystem(path)
    return fs.isfile(inner)


def read_manifest(
    csv: str | Path,
    columns: Sequence[str] = ("image",),
    check_files: bool = True,
    id_column: str = "id",
    unique: Sequence[str] | None = (),
) -> pd.DataFrame:
    """Read a manifest, require ``columns``, and report duplicate rows and missing files by row number.

    Paths may be local or URLs (``s3://...``). Row numbers are 1-based data rows (the header is row 0).
    Rows repeating an earlier row's ``unique`` columns (default: ``columns``) are problems; ``None``
    allows repeats (e.g. several syntheses from one mask).
    Without an ``id`` column, ids are made from the first column's file names (made unique with the
    row number when two names collide).
    """
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ManifestError(f"{csv}: cannot be read as CSV ({error})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ManifestError(f"{csv}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise ManifestError(f"{csv}: has no rows")
    problems = []
    for row, values in enumerate(frame[list(columns)].itertuples(index=False), start=1):
        for column, value in zip(columns, values, strict=True):
            if not value.strip():
                problems.append(f"row {row}: empty {column}")
            elif check_files and not _exists(value):
                problems.append(f"row {row}: {column} {value} does not exist")
    if unique is not None:
        duplicated = frame.duplicated(subset=list(unique or columns), keep="first")
        for row in (frame.index[duplicated] + 1).tolist():
            problems.append(f"row {row}: duplicates an earlier row")
    if problems:
        shown = "\n  ".join(problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise ManifestError(f"{csv}: {len(problems)} problem(s)\n  {shown}")
    if id_column not in frame.columns:
        stems = frame[columns[0]].map(lambda p: Path(p.split("://")[-1]).name.split(".")[0])
        clash = stems.duplicated(keep=False)
        frame.insert(
            0, id_column, [f"{s}_{i}" if c else s for i, (s, c) in enumerate(zip(stems, clash, strict=True))]
        )
    return frame.reset_index(drop=True)
