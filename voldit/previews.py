"""Preview images: axial, coronal and sagittal mid-slices of a volume (with its mask's outlines), and a
contact sheet of many previews, because people would rather look than read."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

from voldit import storage

PANEL = 128  # pixels along a panel's longer side
WINDOW = (-1000.0, 1000.0)  # the model's HU window, so the preview shows what the model produces


def _canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to RAS+ (so every preview reads the same way); returns the array and its spacing."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[ornt[:, 0].astype(int)]
    return nib.orientations.apply_orientation(array, ornt), spacing


def _labelled_centre(labels: np.ndarray) -> list[int] | None:
    """Per axis, the median index of the labelled voxels (None when nothing is labelled), from the
    labelled-voxel counts per slice: no list of every labelled voxel's coordinates."""
    labelled = labels != 0
    centre = []
    for axis in range(labelled.ndim):
        others = tuple(a for a in range(labelled.ndim) if a != axis)
        counts = np.cumsum(labelled.sum(axis=others, dtype=np.int64))
        if counts[-1] == 0:
            return None
        centre.append(int(np.searchsorted(counts, (counts[-1] + 1) // 2)))
    return centre


def _slices(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through ``centre``, as images with superior/anterior up."""
    x, y, z = centre
    return [
        volume[:, :, z].T[::-1],  # axial: rows anterior -> posterior, columns left -> right (x)
        volume[:, y, :].T[::-1],  # coronal: rows superior -> inferior
        volume[x, :, :].T[::-1],  # sagittal
    ]


def _aspects(spacing: np.ndarray) -> list[tuple[float, float]]:
    sx, sy, sz = spacing
    return [(sx, sy), (sx, sz), (sy, sz)]  # (column, row) spacing of each plane


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour's, on labelled structures."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels != 0)


def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(int(label) * 7919)
    hue = rng.uniform(0, 1)
    r, g, b = (np.clip(np.abs(((hue * 6 + k) % 6) - 3) - 1, 0, 1) for k in (0, 4, 2))
    return int(80 + 175 * r), int(80 + 175 * g), int(80 + 175 * b)


def _panel(grey: np.ndarray, spacing: tuple[float, float], labels: np.ndarray | None) -> Image.Image:
    lo, hi = WINDOW
    grey = np.clip(grey.astype(np.float32), lo, hi)
    rgb = np.repeat(((grey - lo) / (hi - lo) * 255).astype(np.uint8)[..., None], 3, -1)
    if labels is not None:
        edge = _outline(labels)
        for label in np.unique(labels[edge]):
            rgb[edge & (labels == label)] = _colour(label)
    height_mm, width_mm = grey.shape[0] * spacing[1], grey.shape[1] * spacing[0]
    scale = PANEL / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    image = Image.fromarray(rgb).resize(size, Image.NEAREST if labels is not None else Image.BILINEAR)
    canvas = Image.new("RGB", (PANEL, PANEL))
    canvas.paste(image, ((PANEL - size[0]) // 2, (PANEL - size[1]) // 2))
    return canvas


def preview(
    volume: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None, title: str = ""
) -> Image.Image:
    """Three mid-slices of a HU volume in a row; with a label map, a second row with its outlines.

    Slices pass through the centre of the labelled region when there is one, else the volume's middle.
    """
    volume, spacing = _canonical(np.asarray(volume), affine)
    labels = _canonical(np.asarray(mask), affine)[0] if mask is not None else None
    centre = _labelled_centre(labels) if labels is not None else None
    centre = centre or [n // 2 for n in volume.shape]
    aspects = _aspects(spacing)
    rows = [[_panel(s, a, None) for s, a in zip(_slices(volume, centre), aspects, strict=True)]]
    if labels is not None:
        pairs = zip(_slices(volume, centre), _slices(labels, centre), aspects, strict=True)
        rows.append([_panel(s, a, lab) for s, lab, a in pairs])
    header = 14 if title else 0
    sheet = Image.new("RGB", (3 * PANEL, len(rows) * PANEL + header))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            sheet.paste(panel, (c * PANEL, header + r * PANEL))
    if title:
        ImageDraw.Draw(sheet).text((3, 1), title[:60], fill=(255, 255, 255))
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temporary name in the same folder, then renamed)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())
    return Path(path)


def contact_sheet(previews: Sequence[tuple[str, Path]], columns: int = 4, limit: int = 64) -> Image.Image:
    """Previews (title, PNG path) side by side, ``columns`` per row, the first ``limit`` of them (each
    already carries its title)."""
    shown = list(previews)[:limit]
    if not shown:
        raise ValueError("no previews to put on a contact sheet")
    images = [Image.open(path).convert("RGB") for _, path in shown]
    width = max(i.width for i in images)
    height = max(i.height for i in images)
    rows = (len(images) + columns - 1) // columns
    footer = 16 if len(previews) > limit else 0
    sheet = Image.new("RGB", (columns * width, rows * height + footer), (24, 24, 24))
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * width, (k // columns) * height))
    if footer:
        ImageDraw.Draw(sheet).text(
            (4, rows * height + 2), f"first {limit} of {len(previews)} volumes", fill=(255, 255, 255)
        )
    return sheet
