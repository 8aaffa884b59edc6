"""The quality gate of bulk synthesis: each generated volume checked, label by label, against the HU of
the real data the model was trained on.

Reference statistics are gathered at encode time from the real images and their masks, on the crops
the model learns from and in the HU window it generates (`voldit.data.intensity`): per label value of
each condition key (0 is the background inside the field of view), a histogram of HU in 10-HU bins.
Histograms add up over rows and parts, so the reference of 100,000 rows is exact and the order they
were encoded in does not matter; `reference` turns them into median, 5th and 95th percentiles and a
voxel count. They travel in the latent dataset's `dataset.json` and from there in the TGCA checkpoint.

A generated volume passes when every label it has enough voxels of (`QCThresholds.min_voxels`) passes:
the label's median HU lies within the reference's 5th-95th percentile range, and at least
`min_inside` of its voxels do. Both bounds come from the real data; the thresholds only say how much of
a label may stray, and they are the user's to set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from voldit.data.intensity import HU_MAX, HU_MIN, hu_bins, hu_edges

BIN_HU = 10  # histogram bin width: finer than any threshold a user would set on tissue HU
EDGES = hu_edges(BIN_HU)  # 201 edges, 200 bins over the window
BINS = len(EDGES) - 1


@dataclass(frozen=True)
class QCThresholds:
    """How much of a label may stray from the reference (the ranges themselves come from the data)."""

    # Labels with fewer voxels in the volume are not judged: a median of a few dozen voxels on a 64^3
    # crop is mostly partial-volume edge, not tissue.
    min_voxels: int = 100
    # The reference range holds 90% of the real voxels by construction; a single real crop keeps
    # 67-89% of its worst label's voxels inside it (the 12 example CT crops, 2 of them not in the
    # reference; tests/test_qc.py), so 0.5 passes real anatomy and fails an organ of the wrong tissue.
    min_inside: float = 0.5

    def __post_init__(self) -> None:
        if self.min_voxels < 1:
            raise ValueError(f"min_voxels must be at least 1, got {self.min_voxels}")
        if not 0.0 <= self.min_inside <= 1.0:
            raise ValueError(f"min_inside must be in [0, 1], got {self.min_inside}")


def _label_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label values present, each voxel's index into them): by lookup for the small non-negative labels
    of label maps (no sort of the volume), by np.unique otherwise."""
    flat = np.asarray(labels).ravel()
    if flat.size and 0 <= flat.min() and flat.max() < 65536:
        flat = flat.astype(np.int64)
        present = np.flatnonzero(np.bincount(flat))
        lookup = np.zeros(int(present[-1]) + 1, np.int64)
        lookup[present] = np.arange(len(present))
        return present, lookup[flat]
    return np.unique(flat, return_inverse=True)


def _histograms(hu: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(HU in the window, flat; label values present; each voxel's index into them; their histograms,
    labels x BINS), in one pass whatever the number of labels."""
    if np.shape(hu) != np.shape(labels):
        raise ValueError(f"image {np.shape(hu)} and labels {np.shape(labels)} differ in shape")
    hu = np.clip(np.asarray(hu, np.float32), HU_MIN, HU_MAX).ravel()  # the window the model generates in
    values, index = _label_index(labels)
    bins = hu_bins(hu, BIN_HU)
    histograms = np.bincount(index * BINS + bins, minlength=len(values) * BINS).reshape(len(values), BINS)
    return hu, values, index, histograms


def label_histograms(hu: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """HU histograms (10-HU bins over the window, int64 counts) of each label value's voxels."""
    _, values, _, histograms = _histograms(hu, labels)
    return {int(v): histograms[k] for k, v in enumerate(values)}


def add_histograms(total: dict[str, dict[str, list[int]]], key: str, histograms: dict) -> None:
    """Add ``histograms`` ({label: counts}) into ``total[key]`` (JSON-friendly: labels as strings)."""
    into = total.setdefault(key, {})
    for label, counts in histograms.items():
        old = into.get(str(label))
        into[str(label)] = (np.asarray(counts, np.int64) + (old if old is not None else 0)).tolist()


def _percentile(counts: np.ndarray, q: float) -> float:
    """The q-th percentile (0-100) of the HU a histogram counts, interpolated within its bin."""
    cumulative = np.cumsum(counts)
    target = q / 100.0 * cumulative[-1]
    k = int(np.searchsorted(cumulative, target, side="left"))
    below = cumulative[k - 1] if k else 0
    within = (target - below) / counts[k] if counts[k] else 0.0
    return float(EDGES[k] + within * BIN_HU)


def reference(histograms: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, dict]]:
    """Per condition key and label: median, 5th and 95th percentile HU and the voxel count."""
    out: dict[str, dict[str, dict]] = {}
    for key, labels in histograms.items():
        out[key] = {}
        for label, counts in sorted(labels.items(), key=lambda item: int(item[0])):
            counts = np.asarray(counts, np.int64)
            if counts.sum() == 0:
                continue
            out[key][label] = {
                "median": round(_percentile(counts, 50), 1),
                "p5": round(_percentile(counts, 5), 1),
                "p95": round(_percentile(counts, 95), 1),
                "voxels": int(counts.sum()),
            }
    return out


def measure(
    hu: np.ndarray, labels: np.ndarray, ref: dict[str, dict]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One volume (HU) on its label map, in two passes whatever the number of labels: the label values
    present, each one's HU histogram (labels x BINS) and its voxels inside ``ref``'s 5-95% range (0 for
    labels ``ref`` does not know)."""
    hu, values, index, histograms = _histograms(hu, labels)
    known = [ref.get(str(int(v))) for v in values]
    low = np.array([k["p5"] if k else np.inf for k in known], np.float32)
    high = np.array([k["p95"] if k else -np.inf for k in known], np.float32)
    inside = np.bincount(index, weights=(hu >= low[index]) & (hu <= high[index]), minlength=len(values))
    return values, histograms, inside.astype(np.int64)


def score(hu: np.ndarray, labels: np.ndarray, ref: dict[str, dict], thresholds: QCThresholds) -> dict:
    """Check one volume (HU) against ``ref`` (one condition key's reference, by label) on its label map.

    Returns {"passed", "labels": {label: {median, inside, voxels, low, high, passed}}, "failed": [reasons]}:
    medians to a 10-HU bin (interpolated), the share inside the reference range exact. Labels the
    reference does not know, or with too few voxels, are listed but not judged. Two passes over the
    volume whatever the number of labels (4 CPU s for 512x512x256).
    """
    values, histograms, inside = measure(hu, labels, ref)
    known = [ref.get(str(int(v))) for v in values]
    low = np.array([k["p5"] if k else np.inf for k in known], np.float32)
    high = np.array([k["p95"] if k else -np.inf for k in known], np.float32)
    out: dict[int, dict] = {}
    failed = []
    for k, value in enumerate(values.tolist()):
        voxels = int(histograms[k].sum())
        entry = {"voxels": voxels, "median": round(_percentile(histograms[k], 50), 1)}
        if known[k] is None or voxels < thresholds.min_voxels:
            entry["passed"] = None  # not judged
            out[int(value)] = entry
            continue
        entry.update(low=float(low[k]), high=float(high[k]), inside=round(float(inside[k]) / voxels, 3))
        reasons = []
        if not low[k] <= entry["median"] <= high[k]:
            reasons.append(f"median {entry['median']:.0f} HU outside the real {low[k]:.0f}..{high[k]:.0f}")
        if entry["inside"] < thresholds.min_inside:
            reasons.append(
                f"{entry['inside']:.0%} of voxels in the real range (needs {thresholds.min_inside:.0%})"
            )
        entry["passed"] = not reasons
        if reasons:
            failed.append(f"label {int(value)}: " + "; ".join(reasons))
        out[int(value)] = entry
    return {"passed": not failed, "labels": out, "failed": failed}


RETRIES = 2  # samplings with the next seed after a failed gate: a bad draw gets two more chances


def settings_dict(thresholds: QCThresholds, retries: int = RETRIES) -> dict:
    """The gate's settings as a run passes and records them: {min_voxels, min_inside, retries}."""
    return {**asdict(thresholds), "retries": retries}


def parse(settings: dict) -> tuple[QCThresholds, int]:
    """`settings_dict`'s output back as (thresholds, retries); ValueError names what is wrong."""
    settings = dict(settings)
    retries = int(settings.pop("retries", RETRIES))
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    return QCThresholds(**settings), retries
