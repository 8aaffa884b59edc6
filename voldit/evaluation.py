"""`voldit evaluate`: how close a set of generated CT volumes is to a set of real ones, and how well
conditional volumes follow their masks. Every metric is a plain function of arrays, so it can be checked
by hand; no downloaded networks (the feature distance uses the project's own VQ-GAN encoder).

Metrics:
  HU histogram distance   1-Wasserstein distance (HU) and Jensen-Shannon divergence (bits) between the
                          pooled voxel HU histograms over [-1000, 1000] in 20-HU bins.
  MMD                     squared maximum mean discrepancy (biased V-statistic, Gaussian kernel with the
                          median pairwise distance as bandwidth) between volumes resized to one grid.
  MS-SSIM diversity       mean MS-SSIM over all pairs within a set (lower: more diverse), for the
                          generated and the real set; similar values mean similar diversity.
  VQ-GAN Frechet distance Frechet distance between Gaussians fitted to VQ-GAN encoder features (per
                          channel mean, std and 2x2x2 pooled means) of each set.
  mask fidelity           per generated volume, Dice between its mask's labelled region split into
                          tissue classes (each label's class: the majority HU class of that label in the
                          real CTs) and the same region classified by HU thresholds of the generated
                          volume (reported beside the real CTs' own score against their masks, the
                          ceiling); and per label, the difference of median HU (generated vs real).
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from voldit import storage
from voldit.data.intensity import HU_MAX, HU_MIN, hu_to_unit
from voldit.data.nifti import VolumeError, read_volume

log = logging.getLogger(__name__)

HU_BIN = 20.0
TISSUES = ("air", "soft tissue", "bone")
TISSUE_EDGES = (-400.0, 200.0)  # HU: air/lung below -400, bone from 200, soft tissue and fat between
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # the first three scales of Wang et al.'s weights
NIFTI = (".nii", ".nii.gz")


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated as asked; the message says what to give instead."""


@dataclass
class Item:
    id: str
    image: str
    mask: str | None = None


def load_items(source: str | Path) -> list[Item]:
    """A set of volumes: a `voldit synthesize` output folder (its manifest's ok rows, with masks), a CSV
    with an ``image`` column (and optionally ``mask``), or a folder of NIfTI files (recursively); each
    local or in object storage (``s3://``), whose volumes are then read from there."""
    source = str(source).rstrip("/")
    manifest = storage.join(source, "manifest.csv")
    if storage.exists(manifest):
        frame = _read_csv(manifest)
        frame = frame[frame["status"] == "ok"]
        key = next((c for c in ("mask", *frame.columns[1:]) if c in frame.columns), None)
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


def hu_histogram(volumes: Sequence[np.ndarray], bin_width: float = HU_BIN) -> tuple[np.ndarray, np.ndarray]:
    """Pooled voxel histogram over [HU_MIN, HU_MAX] (values outside are clipped in): (density, edges)."""
    edges = np.arange(HU_MIN, HU_MAX + bin_width, bin_width)
    counts = sum(np.histogram(np.clip(v, HU_MIN, HU_MAX), bins=edges)[0] for v in volumes)
    return counts / counts.sum(), edges


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


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> tuple[float, float]:
    """Squared MMD (biased V-statistic) of samples x (n, d) and y (m, d) with k(a, b) =
    exp(-|a - b|^2 / (2 s^2)); s defaults to the median pairwise distance of x and y pooled.
    Returns (mmd2, s). Identical sets give exactly 0."""
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = np.maximum(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1), 0.0)
    if bandwidth is None:
        upper = np.sqrt(d2[np.triu_indices(len(z), 1)])
        positive = upper[upper > 0]
        bandwidth = float(np.median(positive)) if positive.size else 1.0
    k = np.exp(-d2 / (2 * bandwidth**2))
    n = len(x)
    value = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return float(max(value, 0.0)), bandwidth


def ms_ssim_diversity(volumes: Sequence[torch.Tensor], kernel_size: int = 7) -> float | None:
    """Mean MS-SSIM over every pair of (1, X, Y, Z) volumes in [-1, 1] (three scales, MONAI's metric);
    None for fewer than two volumes."""
    from monai.metrics import MultiScaleSSIMMetric

    if len(volumes) < 2:
        return None
    total = sum(MS_SSIM_WEIGHTS)
    metric = MultiScaleSSIMMetric(
        spatial_dims=3, data_range=2.0, kernel_size=kernel_size, weights=[w / total for w in MS_SSIM_WEIGHTS]
    )
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    a = torch.stack([volumes[i] for i, _ in pairs])
    b = torch.stack([volumes[j] for _, j in pairs])
    return float(metric(a, b).mean())


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
    for volume in volumes:
        z = vq.encode(volume[None].float())[0]  # (C, d, h, w)
        pooled = F.adaptive_avg_pool3d(z[None], 2)[0].flatten()
        rows.append(torch.cat([z.mean((1, 2, 3)), z.std((1, 2, 3)), pooled]).numpy())
    return np.stack(rows)


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


def _flat(volumes: Sequence[torch.Tensor]) -> np.ndarray:
    return np.stack([v.flatten().numpy() for v in volumes])  # (n, voxels)


def _read(item: Item, what: str = "image") -> np.ndarray:
    path = item.image if what == "image" else item.mask
    try:
        return read_volume(path).array
    except VolumeError as error:
        raise EvaluationError(f"cannot evaluate {item.id}: {error}") from None


def evaluate(
    generated: str | Path,
    real: str | Path,
    vqgan: str | Path | None = None,
    size: Sequence[int] | None = None,
) -> tuple[dict, dict]:
    """Every metric for the generated set against the real one. Returns (results, plot data)."""
    from voldit.builders import model_from_checkpoint
    from voldit.checkpoint import load_checkpoint

    gen_items, real_items = load_items(generated), load_items(real)
    if not gen_items or not real_items:
        raise EvaluationError(
            f"nothing to compare: {len(gen_items)} generated, {len(real_items)} real volumes"
        )
    vq = None
    if vqgan:
        ckpt = load_checkpoint(vqgan, stage="vqgan")
        vq = model_from_checkpoint(ckpt)
        size = size or list(ckpt.config.training.roi_size)
    size = list(size or (64, 64, 32))
    gen = [_read(i) for i in gen_items]
    ref = [_read(i) for i in real_items]
    p, edges = hu_histogram(gen)
    q, _ = hu_histogram(ref)
    gen_grid, ref_grid = [resize(v, size) for v in gen], [resize(v, size) for v in ref]
    mmd2, bandwidth = mmd(_flat(gen_grid), _flat(ref_grid))
    results: dict = {
        "generated": {"source": str(generated), "volumes": len(gen)},
        "real": {"source": str(real), "volumes": len(ref)},
        "grid": size,
        "hu_histogram": histogram_distances(p, q),
        "mmd": {"mmd2": mmd2, "bandwidth": bandwidth},
        "ms_ssim_diversity": {"generated": ms_ssim_diversity(gen_grid), "real": ms_ssim_diversity(ref_grid)},
        "hu_mean": {
            "generated": float(np.mean([v.mean() for v in gen])),
            "real": float(np.mean([v.mean() for v in ref])),
        },
    }
    if vq is not None:
        results["vqgan_frechet_distance"] = {
            "value": frechet_distance(vqgan_features(vq, gen_grid), vqgan_features(vq, ref_grid)),
            "vqgan": str(vqgan),
        }
    plots = {"edges": edges, "generated": p, "real": q, "dice": []}
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
        plots["dice"] = [(k, v) for k, v in dice.items() if v is not None]
    results["_items"] = {"generated": gen_items, "real": real_items}
    return results, plots
