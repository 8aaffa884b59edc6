"""The evaluation report: ``evaluation.json``, a short ``report.md`` with plots and preview images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voldit.data.nifti import read_volume
from voldit.evaluation import TISSUES, evaluate
from voldit.previews import contact_sheet, preview, save_png

SHOWN = 4  # previews per set in the report


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _plots(plots: dict, output: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    centres = (plots["edges"][:-1] + plots["edges"][1:]) / 2
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.plot(centres, plots["real"], label="real", color="tab:blue")
    ax.plot(centres, plots["generated"], label="generated", color="tab:orange")
    ax.set_xlabel("HU")
    ax.set_ylabel("fraction of voxels")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "hu_histogram.png")
    plt.close(fig)
    names.append("hu_histogram.png")
    if plots["dice"]:
        ids, values = zip(*plots["dice"], strict=True)
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(ids) + 1), dpi=100)
        ax.barh(range(len(ids)), values, color="tab:green")
        ax.set_yticks(range(len(ids)), ids, fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("tissue Dice (mask vs generated HU classes)")
        fig.tight_layout()
        fig.savefig(output / "mask_dice.png")
        plt.close(fig)
        names.append("mask_dice.png")
    return names


def _previews(items, output: Path, kind: str) -> Path | None:
    shown = []
    for item in items[:SHOWN]:
        volume = read_volume(item.image)
        mask = np.rint(read_volume(item.mask).array).astype(np.int32) if item.mask else None
        if mask is not None and mask.shape != volume.array.shape:
            mask = None
        path = save_png(
            preview(volume.array, volume.affine, mask, title=f"{kind} {item.id}"),
            output / "previews" / f"{kind}_{len(shown)}.png",
        )
        shown.append((item.id, path))
    if not shown:
        return None
    return save_png(contact_sheet(shown, columns=len(shown)), output / f"{kind}_previews.png")


def write_report(generated, real, output, vqgan=None, size=None) -> dict:
    """Evaluate and write evaluation.json, report.md, plots and previews into ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results, plots = evaluate(generated, real, vqgan, size)
    items = results.pop("_items")
    (output / "evaluation.json").write_text(json.dumps(results, indent=2))
    figures = _plots(plots, output)
    sheets = [_previews(items["generated"], output, "generated"), _previews(items["real"], output, "real")]
    (output / "report.md").write_text(_markdown(results, figures, [s for s in sheets if s]))
    return results


def _markdown(r: dict, figures: list[str], sheets: list[Path]) -> str:
    h, m, d = r["hu_histogram"], r["mmd"], r["ms_ssim_diversity"]
    lines = [
        "# voldit evaluation",
        "",
        f"{r['generated']['volumes']} generated volumes (`{r['generated']['source']}`) against "
        f"{r['real']['volumes']} real ones (`{r['real']['source']}`); set metrics on a "
        f"{'x'.join(map(str, r['grid']))} grid.",
        "",
        "| metric | value | reading |",
        "|---|---|---|",
        f"| HU histogram 1-Wasserstein | {_fmt(h['wasserstein_hu'])} HU | 0 when the HU distributions match |",
        f"| HU histogram Jensen-Shannon | {_fmt(h['js_divergence'])} bits | 0 to 1 |",
        f"| MMD^2 (Gaussian kernel, bandwidth {_fmt(m['bandwidth'])}) | {_fmt(m['mmd2'])} | 0 for identical sets |",
        f"| MS-SSIM within generated | {_fmt(d['generated'])} | lower is more diverse |",
        f"| MS-SSIM within real | {_fmt(d['real'])} | the diversity to match |",
        f"| mean HU generated / real | {_fmt(r['hu_mean']['generated'])} / {_fmt(r['hu_mean']['real'])} | |",
    ]
    if "vqgan_frechet_distance" in r:
        lines.append(
            f"| VQ-GAN Frechet distance (project's own encoder) | {_fmt(r['vqgan_frechet_distance']['value'])} "
            "| 0 for identical sets; not comparable to FID |"
        )
    if "mask_fidelity" in r:
        f = r["mask_fidelity"]
        lines += [
            f"| mask fidelity: tissue Dice (mean over volumes) | {_fmt(f['tissue_dice_mean'])} | real CTs "
            f"score {_fmt(f['tissue_dice_real'])} against their own masks |",
            f"| mask fidelity: median HU error per label | {_fmt(f['label_median_hu_abs_error'])} HU "
            f"({f['labels_compared']} labels) | 0 is perfect |",
        ]
        lines += [
            "",
            f"Tissue classes by HU: {TISSUES[0]} below {f['tissue_edges_hu'][0]:g}, {TISSUES[2]} from "
            f"{f['tissue_edges_hu'][1]:g}, {TISSUES[1]} between; each label's class is its majority class in "
            "the real CTs.",
        ]
    lines.append("")
    lines += [f"![{name}]({name})" for name in figures]
    lines += ["", "Previews (axial, coronal, sagittal; second row: mask outlines):", ""]
    lines += [f"![{sheet.stem}]({sheet.name})" for sheet in sheets]
    return "\n".join(lines) + "\n"
