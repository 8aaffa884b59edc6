"""`voldit evaluate`: how close a set of generated CT volumes is to a set of real ones, and how well
conditional volumes follow their masks. Every metric is a plain function of arrays, so it can be checked
by hand; no downloaded networks (the feature distance uses the project's own VQ-GAN encoder).

Metrics:
  HU histogram distance   1-Wasserstein distance (HU) and Jensen-Shannon divergence (bits) between the
                          pooled voxel HU histograms over [-1000, 1000] in 20-HU bins.
  MMD                     squared maximum mean discrepancy (biased V-statistic, Gaussian kernel) between
                          volumes resized to one grid; the bandwidth is the median pairwise distance
                          between the real volumes alone.
  MS-SSIM diversity       mean MS-SSIM over all pairs within a set (lower: more diverse), for the
                          generated and the real set; similar values mean similar diversity (the gap is
                          the score compared with the baselines).
  VQ-GAN Frechet distance Frechet distance between Gaussians fitted to VQ-GAN encoder features (per
                          channel mean, std and 2x2x2 pooled means) of each set.
  mask fidelity           per generated volume, Dice between its mask's labelled region split into
                          tissue classes (each label's class: the majority HU class of that label in the
                          real CTs) and the same region classified by HU thresholds of the generated
                          volume (reported beside the real CTs' own score against their masks, the
                          ceiling); and per label, the difference of median HU (generated vs real).

The yardstick (grid, bins, MMD bandwidth, MS-SSIM scales) depends on the real set alone, so scores of
different generated sets against one real set compare. Beside them, the same scores for three seeded
baselines: half the real set against the other half (the floor), and two kinds of voxel noise.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from voldit import qc, storage
from voldit.data.intensity import HU_MAX, HU_MIN, hu_counts, hu_edges, hu_to_unit
from voldit.data.nifti import VolumeError, read_volume
from voldit.errors import VolditError
from voldit.synthesis import read_outputs

log = logging.getLogger(__name__)

HU_BIN = 20.0  # fixed, like the HU range: every report bins the same way
TISSUES = ("air", "soft tissue", "bone")
TISSUE_EDGES = (-400.0, 200.0)  # HU: air/lung below -400, bone from 200, soft tissue and fat between
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # the first three scales of Wang et al.'s weights
MS_SSIM_KERNEL = 7  # Gaussian window (voxels); three scales of it fit a 32-voxel axis
DEFAULT_GRID = (64, 64, 32)  # without a VQ-GAN (whose crop size is the grid otherwise) or --size
BASELINE_SEED = 0  # fixed, so reports on one real set share their baselines
FEATURE_BATCH = 4  # volumes per VQ-GAN encoder call: several times faster than one by one on a CPU
# The set metrics compared with the baselines; lower is better for each.
SET_METRICS = ("wasserstein_hu", "js_divergence", "mmd2", "ms_ssim_gap", "vqgan_frechet_distance")
BASELINES = ("real_halves", "histogram_noise", "uniform_noise")
NIFTI = (".nii", ".nii.gz")


class EvaluationError(VolditError, ValueError):
    """Inputs that cannot be evaluated as asked; the message says what to give instead."""


@dataclass
class Item:
    id: str
    image: str
    mask: str | None = None


def load_items(source: str | Path) -> list[Item]:
    """A set of volumes: a `voldit synthesize` output folder (its manifest's rows with a volume, with
    masks: those that failed the quality gate too, so the model is measured, not the gate), a CSV
    with an ``image`` column (and optionally ``mask``), or a folder of NIfTI files (recursively); each
    local or in object storage (``s3://``), whose volumes are then read from there."""
    source = str(source).rstrip("/")
    if (synthesized := read_outputs(source)) is not None:
        frame, keys = synthesized
        key = "mask" if "mask" in keys else next(iter(keys), None)
        return [Item(r["id"], r["output"], r.get(key)) for r in frame.to_dict("records")]
    if source.endswith(".csv") and storage.exists(source):
        frame = _read_csv(source)
        if "image" not in frame.columns:
            raise EvaluationError(f"{source}: needs an `image` column (and optionally `mask`)")
        return [
            Item(r.get("id") or _stem(r["image"]), r["image"], r.get("mask") or None)
            for r in frame.to_dict("records")
        ]
    if storage.is_remote(source):
        files = storage.glob(storage.join(source, "**"))
    elif Path(source).is_dir():
        files = sorted(str(p) for p in Path(source).rglob("*"))
    else:
        raise EvaluationError(f"{source}: not a folder of NIfTI files, a CSV or a `voldit synthesize` output")
    return [Item(_stem(p), p) for p in files if _stem(p) and p.endswith(NIFTI)]


def _stem(path: str) -> str:
    """A file's name without its extensions; empty for hidden files (temporaries)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return "" if name.startswith(".") else name.split(".")[0]


def _read_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(path)), dtype=str, keep_default_na=False)


def histogram_distances(p: np.ndarray, q: np.ndarray, bin_width: float = HU_BIN) -> dict[str, float]:
    """1-Wasserstein distance (HU) and Jensen-Shannon divergence (bits) of two binned densities."""
    wasserstein = float(np.abs(np.cumsum(p) - np.cumsum(q)).sum() * bin_width)
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return {"wasserstein_hu": wasserstein, "js_divergence": (kl(p) + kl(q)) / 2}


def resize(volume_hu: np.ndarray, size: Sequence[int]) -> torch.Tensor:
    """A HU volume windowed to [-1, 1] and resized (trilinear) to ``size``: (1, *size) float32."""
    x = torch.as_tensor(hu_to_unit(volume_hu))[None, None]
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)[0]


def _float64(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def median_distance(x: np.ndarray) -> float | None:
    """Median Euclidean distance between the distinct rows of x (n, d) (repeated rows are left out);
    None when fewer than two rows differ."""
    distances = torch.pdist(_float64(x)).numpy()
    distances = distances[distances > 0]
    return float(np.median(distances)) if distances.size else None


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Squared MMD (biased V-statistic) of samples x (n, d) and y (m, d) with the Gaussian kernel
    k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2)). Identical sets give exactly 0."""

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        distances = torch.cdist(_float64(a), _float64(b), compute_mode="donot_use_mm_for_euclid_dist")
        return float(torch.exp(-(distances**2) / (2 * bandwidth**2)).mean())

    return max(mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y), 0.0)


def ms_ssim_pairs(
    volumes: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], kernel_size: int = MS_SSIM_KERNEL
) -> np.ndarray:
    """MS-SSIM of each (i, j) pair of (1, X, Y, Z) volumes in [-1, 1] (three scales, MONAI's metric):
    (len(pairs),)."""
    from monai.metrics import MultiScaleSSIMMetric

    if not pairs:
        return np.zeros(0)
    total = sum(MS_SSIM_WEIGHTS)
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=2.0, kernel_size=kernel_size, weights=[w / total for w in MS_SSIM_WEIGHTS]
    )
    a = torch.stack([volumes[i] for i, _ in pairs])
    b = torch.stack([volumes[j] for _, j in pairs])
    return metric(a, b).flatten().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to features a (n, d) and b (m, d):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), via symmetric eigendecompositions."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu = a.mean(0) - b.mean(0)
    sa = np.atleast_2d(np.cov(a, rowvar=False)) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    sb = np.atleast_2d(np.cov(b, rowvar=False)) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    value = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


@torch.no_grad()
def vqgan_features(vq, volumes: Sequence[torch.Tensor]) -> np.ndarray:
    """Per volume: the VQ-GAN encoder's per-channel mean and std and its 2x2x2 average-pooled maps
    (before quantisation), concatenated: (n, C * 10)."""
    rows = []
    for start in range(0, len(volumes), FEATURE_BATCH):
        z = vq.encode(torch.stack(list(volumes[start : start + FEATURE_BATCH])).float())  # (b, C, d, h, w)
        pooled = F.adaptive_avg_pool3d(z, 2).flatten(1)
        rows.append(torch.cat([z.mean((2, 3, 4)), z.std((2, 3, 4)), pooled], 1))
    return torch.cat(rows).numpy()


def tissue_class(hu: np.ndarray) -> np.ndarray:
    """0 air, 1 soft tissue, 2 bone, by TISSUE_EDGES."""
    return np.digitize(hu, TISSUE_EDGES).astype(np.int8)


def label_tissues(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[int, int]:
    """Each non-zero label's tissue class: the majority class of its voxels over (HU, mask) pairs."""
    votes: dict[int, np.ndarray] = {}
    for hu, mask in pairs:
        classes = tissue_class(hu)
        for label in np.unique(mask[mask > 0]).astype(int):
            counts = np.bincount(classes[mask == label], minlength=len(TISSUES))
            votes[label] = votes.get(label, 0) + counts
    return {label: int(np.argmax(c)) for label, c in votes.items()}


def mask_dice(hu: np.ndarray, mask: np.ndarray, tissues: dict[int, int]) -> float | None:
    """Mean Dice over tissue classes between the mask's expected classes and the generated volume's HU
    classes, inside the labelled voxels of known labels; None when no labelled voxel has a known label."""
    labels = mask.astype(int)
    lookup = np.full(labels.max() + 1, -1, dtype=np.int8)
    for label, cls in tissues.items():
        if label <= labels.max():
            lookup[label] = cls
    expected = np.where(labels > 0, lookup[labels], -1)
    inside = expected >= 0
    if not inside.any():
        return None
    found = tissue_class(hu)
    scores = []
    for cls in np.unique(expected[inside]):
        e, f = (expected == cls) & inside, (found == cls) & inside
        scores.append(2 * (e & f).sum() / (e.sum() + f.sum()))
    return float(np.mean(scores))


def label_medians(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[int, float]:
    """Median HU of each non-zero label over (HU, mask) pairs."""
    values: dict[int, list[np.ndarray]] = {}
    for hu, mask in pairs:
        for label in np.unique(mask[mask > 0]).astype(int):
            values.setdefault(label, []).append(hu[mask == label])
    return {label: float(np.median(np.concatenate(v))) for label, v in values.items()}


def per_label_hu(real_pairs, gen_pairs) -> dict[str, dict]:
    """Per label, the quality gate's measures over a whole set (voldit.qc): the real median HU and 5-95%
    range, the generated median, and the share of generated voxels inside the real range (the overlap)."""
    histograms: dict = {}
    for hu, mask in real_pairs:
        qc.add_histograms(histograms, "real", qc.label_histograms(hu, np.rint(mask)))
    real = qc.reference(histograms).get("real", {})
    inside: dict[str, int] = {}
    for hu, mask in gen_pairs:  # inside the real range: counted on the voxels themselves, not to a bin
        values, counts, within = qc.measure(hu, np.rint(mask), real)
        qc.add_histograms(histograms, "generated", dict(zip(values.tolist(), counts, strict=True)))
        for value, n in zip(values.tolist(), within.tolist(), strict=True):
            inside[str(value)] = inside.get(str(value), 0) + n
    generated = qc.reference(histograms).get("generated", {})
    shared = sorted(set(real) & set(generated), key=int)
    return {
        label: {
            "real_median": real[label]["median"],
            "real_p5": real[label]["p5"],
            "real_p95": real[label]["p95"],
            "generated_median": generated[label]["median"],
            "generated_inside": round(inside[label] / generated[label]["voxels"], 3),
            "generated_voxels": generated[label]["voxels"],
        }
        for label in shared
    }


@dataclass
class MeasuredSet:
    """A set of volumes as the set metrics see it, kept so that any part of it (the real set's halves)
    is scored again without reading, resizing or encoding anything twice."""

    ids: list[str]
    counts: np.ndarray  # (n, bins): voxels per HU bin of each volume, at the volume's own resolution
    flat: np.ndarray  # (n, voxels): each volume on the grid, windowed to [-1, 1]
    ms_ssim: np.ndarray  # (n, n): MS-SSIM of each measured pair, in both orders; NaN for the others
    features: np.ndarray | None  # (n, C * 10): VQ-GAN features; None without a VQ-GAN

    def subset(self, index: Sequence[int]) -> MeasuredSet:
        index = list(index)
        return MeasuredSet(
            [self.ids[i] for i in index],
            self.counts[index],
            self.flat[index],
            self.ms_ssim[np.ix_(index, index)],
            None if self.features is None else self.features[index],
        )

    def density(self) -> np.ndarray:
        """The pooled HU histogram: (bins,) summing to 1."""
        pooled = self.counts.sum(0)
        return pooled / pooled.sum()

    def diversity(self) -> float | None:
        """Mean MS-SSIM over the measured pairs; None when none was measured."""
        measured = self.ms_ssim[~np.isnan(self.ms_ssim)]
        return float(measured.mean()) if measured.size else None


def measure(
    ids: Sequence[str], volumes_hu: Sequence[np.ndarray], grid: Sequence[int], vq=None, all_pairs: bool = True
) -> MeasuredSet:
    """What the set metrics need of HU volumes of any shapes: HU counts at full resolution, the volumes on
    ``grid``, MS-SSIM of every pair (or, with ``all_pairs`` False, of the disjoint pairs (0, 1), (2, 3), ...:
    enough for sets of independent draws) and, given a VQ-GAN, its features."""
    on_grid = [resize(v, grid) for v in volumes_hu]
    n = len(on_grid)
    pairs = (
        list(itertools.combinations(range(n), 2)) if all_pairs else [(i, i + 1) for i in range(0, n - 1, 2)]
    )
    matrix = np.full((n, n), np.nan)
    if pairs:
        first, second = np.array(pairs).T
        matrix[first, second] = matrix[second, first] = ms_ssim_pairs(on_grid, pairs)
    return MeasuredSet(
        list(ids),
        np.stack([hu_counts(v, HU_BIN) for v in volumes_hu]),
        _flat(on_grid),
        matrix,
        None if vq is None else vqgan_features(vq, on_grid),
    )


def set_scores(candidate: MeasuredSet, reference: MeasuredSet, bandwidth: float) -> dict[str, float | None]:
    """Every set metric of ``candidate`` against ``reference`` (lower is better for each of SET_METRICS);
    ``ms_ssim_within`` is the candidate's own diversity, ``ms_ssim_gap`` its distance to the reference's."""
    within, target = candidate.diversity(), reference.diversity()
    both = candidate.features is not None and reference.features is not None
    return {
        **histogram_distances(candidate.density(), reference.density()),
        "mmd2": mmd(candidate.flat, reference.flat, bandwidth),
        "ms_ssim_within": within,
        "ms_ssim_gap": None if within is None or target is None else abs(within - target),
        "vqgan_frechet_distance": frechet_distance(candidate.features, reference.features) if both else None,
    }


def yardstick(real: MeasuredSet, grid: Sequence[int], vqgan: str | None, seed: int) -> dict:
    """Every free parameter of the set metrics: constants, or taken from the real set alone (the MMD
    bandwidth), so that one real set measures any generated set alike."""
    bandwidth = median_distance(real.flat)
    if bandwidth is None:
        raise EvaluationError(
            "the real volumes are all the same on the grid: give at least two different ones"
        )
    return {
        "grid": list(grid),
        "hu_range": [HU_MIN, HU_MAX],
        "hu_bin_width": HU_BIN,
        "mmd_bandwidth": bandwidth,
        "mmd_bandwidth_from": "median distance between the distinct real volumes on the grid, windowed to [-1, 1]",
        "ms_ssim": {"kernel_size": MS_SSIM_KERNEL, "weights": list(MS_SSIM_WEIGHTS), "data_range": 2.0},
        "vqgan": vqgan,
        "baseline_seed": seed,
    }


def real_halves(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of half A (n // 2 real volumes drawn by ``seed``; drawn, so that a real set listed by
    patient or site does not split along that) and half B (the rest), each in the real set's order."""
    order = np.random.default_rng((seed, BASELINES.index("real_halves"))).permutation(n)
    return sorted(order[: n // 2].tolist()), sorted(order[n // 2 :].tolist())


def noise_volumes(kind: str, density: np.ndarray, count: int, grid: Sequence[int], seed: int) -> np.ndarray:
    """``count`` volumes of independent voxels on ``grid`` in HU, the same for the same seed: (count, *grid)
    float32. "histogram": each voxel in a HU_BIN bin drawn by ``density`` (MeasuredSet.density's) and uniform
    within it; "uniform": uniform over [HU_MIN, HU_MAX]."""
    rng = np.random.default_rng((seed, BASELINES.index(f"{kind}_noise")))
    shape = (count, *grid)
    if kind == "uniform":
        return rng.uniform(HU_MIN, HU_MAX, shape).astype(np.float32)
    bins = rng.choice(len(density), size=shape, p=density)
    return (HU_MIN + (bins + rng.random(shape)) * HU_BIN).astype(np.float32)


def baseline_scores(real: MeasuredSet, count: int, stick: dict, vq=None) -> dict[str, dict]:
    """The set metrics, with the real set's yardstick, for each of BASELINES: half A of the real set
    against half B; and ``count`` volumes (as many as generated) of each kind of noise against the real set."""
    bandwidth, grid, seed = stick["mmd_bandwidth"], stick["grid"], stick["baseline_seed"]
    a, b = real_halves(len(real.ids), seed)
    baselines = {
        "real_halves": {
            "about": "half A of the real volumes (drawn by the seed) scored as if generated, against half B "
            "(the rest) as the real set: what real data scores, the floor a perfect model reaches; with half as "
            "many volumes a side, these biased estimators read somewhat higher than for the full sets, so a "
            "model near the floor can pass it",
            "half_a": [real.ids[i] for i in a],
            "half_b": [real.ids[i] for i in b],
            "scores": set_scores(real.subset(a), real.subset(b), bandwidth),
        }
    }
    about = {
        "histogram": "voxels drawn independently from the real set's HU histogram: near 0 on the histogram "
        "distances by construction, so only the structure metrics tell it from anatomy",
        "uniform": f"voxels uniform in [{HU_MIN:g}, {HU_MAX:g}] HU",
    }
    for kind, text in about.items():
        volumes = noise_volumes(kind, real.density(), count, grid, seed)
        noise = measure([f"{kind}_{k}" for k in range(count)], volumes, grid, vq, all_pairs=False)
        baselines[f"{kind}_noise"] = {
            "about": f"{count} volumes on the grid of {text}; MS-SSIM over disjoint pairs",
            "volumes": count,
            "scores": set_scores(noise, real, bandwidth),
        }
    return baselines


def beats(scores: dict, baselines: dict) -> dict[str, dict[str, bool | None]]:
    """Per set metric and baseline: whether the generated score is strictly lower (None where either is
    missing)."""
    return {
        metric: {
            name: None
            if scores[metric] is None or baseline["scores"][metric] is None
            else scores[metric] < baseline["scores"][metric]
            for name, baseline in baselines.items()
        }
        for metric in SET_METRICS
    }


def _flat(volumes: Sequence[torch.Tensor]) -> np.ndarray:
    return np.stack([v.flatten().numpy() for v in volumes])  # (n, voxels)


def _read(item: Item, what: str = "image") -> np.ndarray:
    """A volume's voxels in RAS order, so volumes stored in other orientations (a synthetic volume keeps
    its mask's) are compared axis for axis; each is then resized whole to the report's grid."""
    path = item.image if what == "image" else item.mask
    try:
        volume = read_volume(path)
    except VolumeError as error:
        raise EvaluationError(f"cannot evaluate {item.id}: {error}") from None
    to_ras = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(volume.affine), nib.orientations.axcodes2ornt("RAS")
    )
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume.array, to_ras))


def evaluate(
    generated: str | Path,
    real: str | Path,
    vqgan: str | Path | None = None,
    size: Sequence[int] | None = None,
    seed: int = BASELINE_SEED,
) -> tuple[dict, dict]:
    """Every metric for the generated set against the real one, and the set metrics of the baselines
    (seeded by ``seed``) with the same yardstick. Returns (results, plot data)."""
    from voldit.builders import model_from_checkpoint
    from voldit.checkpoint import load_checkpoint

    gen_items, real_items = load_items(generated), load_items(real)
    if not gen_items or not real_items:
        raise EvaluationError(
            f"nothing to compare: {len(gen_items)} generated, {len(real_items)} real volumes"
        )
    if len(real_items) < 2:
        raise EvaluationError(
            f"{real}: one real volume; the yardstick needs at least two (the MMD bandwidth "
            "is their median distance)"
        )
    vq = None
    if vqgan:
        ckpt = load_checkpoint(vqgan, stage="vqgan")
        vq = model_from_checkpoint(ckpt)
        size = size or list(ckpt.config.training.roi_size)
    size = list(size or DEFAULT_GRID)
    gen = [_read(i) for i in gen_items]
    ref = [_read(i) for i in real_items]
    gen_set = measure([i.id for i in gen_items], gen, size, vq)
    real_set = measure([i.id for i in real_items], ref, size, vq)
    stick = yardstick(real_set, size, str(vqgan) if vq else None, seed)
    scores = set_scores(gen_set, real_set, stick["mmd_bandwidth"])
    baselines = baseline_scores(real_set, len(gen), stick, vq)
    results: dict = {
        "generated": {"source": str(generated), "volumes": len(gen)},
        "real": {"source": str(real), "volumes": len(ref)},
        "grid": size,
        "hu_histogram": {k: scores[k] for k in ("wasserstein_hu", "js_divergence")},
        "mmd": {"mmd2": scores["mmd2"], "bandwidth": stick["mmd_bandwidth"]},
        "ms_ssim_diversity": {"generated": scores["ms_ssim_within"], "real": real_set.diversity()},
        "hu_mean": {
            "generated": float(np.mean([v.mean() for v in gen])),
            "real": float(np.mean([v.mean() for v in ref])),
        },
        "yardstick": stick,
        "scores": scores,
        "baselines": baselines,
        "generated_beats": beats(scores, baselines),
    }
    if vq is not None:
        results["vqgan_frechet_distance"] = {"value": scores["vqgan_frechet_distance"], "vqgan": str(vqgan)}
    plots = {
        "edges": hu_edges(HU_BIN),
        "generated": gen_set.density(),
        "real": real_set.density(),
        "dice": [],
    }
    conditional = [(i, v) for i, v in zip(gen_items, gen, strict=True) if i.mask]
    real_pairs = [(v, _read(i, "mask")) for i, v in zip(real_items, ref, strict=True) if i.mask]
    if conditional and real_pairs:
        tissues = label_tissues(real_pairs)
        dice = {}
        gen_pairs = []
        for item, volume in conditional:
            mask = _read(item, "mask")
            if mask.shape != volume.shape:
                raise EvaluationError(
                    f"{item.id}: mask shape {mask.shape} differs from the volume's {volume.shape}"
                )
            gen_pairs.append((volume, mask))
            dice[item.id] = mask_dice(volume, mask, tissues)
        real_medians, gen_medians = label_medians(real_pairs), label_medians(gen_pairs)
        shared = sorted(set(real_medians) & set(gen_medians))
        scored = [d for d in dice.values() if d is not None]
        # The same score for the real CTs against their own masks: the ceiling the generated ones approach.
        ceiling = [s for s in (mask_dice(v, m, tissues) for v, m in real_pairs) if s is not None]
        results["mask_fidelity"] = {
            "tissue_dice_mean": float(np.mean(scored)) if scored else None,
            "tissue_dice_real": float(np.mean(ceiling)) if ceiling else None,
            "tissue_dice": dice,
            "label_tissues": {str(k): TISSUES[v] for k, v in sorted(tissues.items())},
            "label_median_hu_abs_error": float(
                np.mean([abs(gen_medians[k] - real_medians[k]) for k in shared])
            )
            if shared
            else None,
            "labels_compared": len(shared),
            "tissue_edges_hu": list(TISSUE_EDGES),
        }
        results["mask_fidelity"]["per_label"] = per_label_hu(real_pairs, gen_pairs)
        plots["dice"] = [(k, v) for k, v in dice.items() if v is not None]
    results["_items"] = {"generated": gen_items, "real": real_items}
    return results, plots
