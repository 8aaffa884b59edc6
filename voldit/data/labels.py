"""Label maps from other label sets onto the one a model was trained on (`--label-map FILE`).

A TotalSegmentator map has 117 classes; a model trained on a merged set knows a few. The file says, per
label value, which value it becomes or that it is dropped (set to background):

    JSON: {"1": 1, "2": 1, "5": 3, "90": "drop"}
    CSV:  one "value,target" pair per line (a header line such as "from,to" is allowed)

Values the file does not name stay as they are.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from voldit import storage
from voldit.errors import VolditError

DROP = "drop"


class LabelMapError(VolditError, ValueError):
    """A label-map file that cannot be read or says something impossible."""


def _value(text, where: str, target: bool = False) -> int:
    if target and str(text).strip().lower() == DROP:
        return 0
    try:
        number = float(str(text).strip())
    except ValueError:
        number = float("nan")
    if not number.is_integer() or not -(2**31) <= number < 2**31:
        wanted = f'an integer label value or "{DROP}"' if target else "an integer label value"
        raise LabelMapError(f"{where}: {text!r} is not {wanted}") from None
    return int(number)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_label_map(path: str | Path) -> dict[int, int]:
    """{value: target} from a JSON or CSV label-map file (local or s3://); "drop" becomes 0."""
    try:
        text = storage.read_text(path)
    except (OSError, ValueError) as error:
        raise LabelMapError(f"label map {path} cannot be read ({error}); check the path") from None
    if str(path).lower().endswith(".json") or text.lstrip()[:1] in ("{", "["):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as error:
            raise LabelMapError(f"label map {path}: not valid JSON ({error})") from None
        if not isinstance(pairs, dict):
            raise LabelMapError(f'label map {path}: expected an object such as {{"5": 1, "7": "drop"}}')
        items = list(pairs.items())
    else:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and len(rows[0]) == 2 and not _is_number(rows[0][0]):
            rows = rows[1:]  # a header
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise LabelMapError(
                f"label map {path}: expected two columns (value,target) per line, got {bad[0]}"
            )
        items = [tuple(r) for r in rows]
    if not items:
        raise LabelMapError(f"label map {path} maps no value; give value,target pairs")
    where = f"label map {path}"
    return {_value(k, where): _value(v, where, target=True) for k, v in items}


def apply_label_map(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """``labels`` with each value the map names replaced by its target (one lookup per voxel)."""
    if not mapping:
        return labels
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < 1 << 16:
        table = np.arange(high + 1, dtype=np.int32)
        for value, target in mapping.items():
            if 0 <= value < table.size:
                table[value] = target
        return table[labels]
    values, inverse = np.unique(labels, return_inverse=True)
    return np.asarray([mapping.get(int(v), int(v)) for v in values], np.int32)[inverse].reshape(labels.shape)
