"""Shared pieces of the benchmarks: timing, device facts and result output. Imports no Ray."""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # voldit from this checkout
from voldit.errors import VolditError  # noqa: E402
from voldit.flops import device_name, peak_flops  # noqa: E402, F401  (the benchmarks' device facts)


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main; a user error (bad path, checkpoint, CSV, config) ends in one line."""
    try:
        main()
    except VolditError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of fn, after warm-up calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def header(device: torch.device, command: str) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command,
    }


def emit(rows: list[dict], meta: dict, columns: list[str], path: str | None, as_json: bool = True) -> None:
    """Print a table and (``as_json``) one JSON document; write the JSON to path when given."""
    doc = {**meta, "results": rows}
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns))
    if as_json:
        print(json.dumps(doc))
    if path:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)


def emit_speedups(
    rows: list[dict],
    key: str,
    device,
    columns: list[str],
    path: str | None,
    baseline: str = "baseline",
    same: tuple[str, ...] = (),
    meta: dict | None = None,
) -> None:
    """``emit`` with a ``speedup`` column, each row's ``key`` over a baseline row's (``path`` == baseline,
    equal in the ``same`` fields), and a ``compared_with`` column naming that row. The baseline at the
    row's batch is used where the run has one; otherwise the baseline's own batch, which the label says
    ("baseline batch 1, this row batch 8"): such a ratio includes what batching buys."""
    for row in rows:
        bases = [
            r
            for r in rows
            if r["path"] == baseline and all(r.get(f) == row.get(f) for f in same) and key in r
        ]
        if not bases or key not in row:
            continue
        base = next((r for r in bases if r["batch"] == row["batch"]), bases[0])
        row["speedup"] = row[key] / base[key]
        label = f"{baseline} batch {base['batch']}"
        if base["batch"] != row["batch"]:
            label += f", this row batch {row['batch']}"
        row["compared_with"] = label
    doc = {**header(device, " ".join(sys.argv)), **(meta or {})}
    emit(rows, doc, [*columns, "speedup", "compared_with"], path)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
