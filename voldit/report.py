"""The evaluation report: ``evaluation.json``, a short ``report.md`` with plots and preview images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voldit.data.nifti import read_volume
from voldit.evaluation import SET_METRICS, TISSUES, evaluate
from voldit.previews import contact_sheet, preview, save_png

SHOWN = 4  # previews per set in the report
METRIC_NAMES = {
    "wasserstein_hu": "HU histogram 1-Wasserstein (HU)",
    "js_divergence": "HU histogram Jensen-Shannon (bits)",
    "mmd2": "MMD^2",
    "ms_ssim_gap": "MS-SSIM within, gap to real's",
    "vqgan_frechet_distance": "VQ-GAN Frechet distance",
}
BASELINE_NAMES = {
    "real_halves": "real half A vs B",
    "histogram_noise": "HU-histogram noise",
    "uniform_noise": "uniform noise",
}


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def baseline_table(r: dict) -> list[list[str]]:
    """Rows of text (a header, then one per set metric): the generated set's score, each baseline's, and
    which baselines the generated set beats (a strictly lower score)."""
    rows = [["lower is better", "generated", *(BASELINE_NAMES[n] for n in r["baselines"]), "generated beats"]]
    for metric in SET_METRICS:
        if r["scores"][metric] is None and all(b["scores"][metric] is None for b in r["baselines"].values()):
            continue  # not measured at all (no VQ-GAN, or a single generated volume)
        verdicts = r["generated_beats"][metric]
        beaten = [BASELINE_NAMES[n] for n, v in verdicts.items() if v]
        judged = [v for v in verdicts.values() if v is not None]
        rows.append(
            [
                METRIC_NAMES[metric],
                _fmt(r["scores"][metric]),
                *(_fmt(b["scores"][metric]) for b in r["baselines"].values()),
                "n/a"
                if not judged
                else "all"
                if len(beaten) == len(verdicts)
                else ", ".join(beaten) or "none",
            ]
        )
    return rows


def baseline_summary(r: dict) -> str:
    """One sentence: on how many set metrics the generated set beats each baseline."""
    parts = []
    for name, label in BASELINE_NAMES.items():
        judged = [v for v in (r["generated_beats"][m][name] for m in SET_METRICS) if v is not None]
        floor = " (the floor)" if name == "real_halves" else ""
        parts.append(f"{label}{floor} on {sum(judged)} of {len(judged)}")
    return "the generated set beats " + ", ".join(parts) + " metrics"


def yardstick_line(r: dict) -> str:
    y = r["yardstick"]
    return (
        f"yardstick (from the real set alone): {'x'.join(map(str, y['grid']))} grid, MMD bandwidth "
        f"{_fmt(y['mmd_bandwidth'])} (median distance between the real volumes), {y['hu_bin_width']:g}-HU bins, "
        f"baseline seed {y['baseline_seed']}"
    )


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


def write_report(generated, real, output, vqgan=None, size=None, failed: list[dict] | None = None) -> dict:
    """Evaluate and write evaluation.json, report.md, plots and previews into ``output``; ``failed``
    rows ({step, id, reason}: a pipeline's rows that made no volume) are listed in both."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results, plots = evaluate(generated, real, vqgan, size)
    items = results.pop("_items")
    if failed:
        results["failed_rows"] = failed
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
        f"| MMD^2 (Gaussian kernel, bandwidth {_fmt(m['bandwidth'])}) | {_fmt(m['mmd2'])} | 0 for identical "
        "sets; bandwidth from the real set alone |",
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
    if (r.get("mask_fidelity") or {}).get("per_label"):
        lines += ["", *_per_label_markdown(r["mask_fidelity"]["per_label"])]
    lines += ["", *_baselines_markdown(r), ""]
    if r.get("failed_rows"):
        lines += [f"{len(r['failed_rows'])} row(s) made no volume and are not in these figures:", ""]
        lines += ["| step | row | reason |", "|---|---|---|"]
        lines += [f"| {f['step']} | {f['id']} | {f['reason']} |" for f in r["failed_rows"]]
        lines.append("")
    lines += [f"![{name}]({name})" for name in figures]
    lines += ["", "Previews (axial, coronal, sagittal; second row: mask outlines):", ""]
    lines += [f"![{sheet.stem}]({sheet.name})" for sheet in sheets]
    return "\n".join(lines) + "\n"


def _per_label_markdown(per_label: dict) -> list[str]:
    """The quality gate's measures per label (voldit.qc), over the whole sets."""
    lines = [
        "## Per label",
        "",
        "HU inside each label of the masks, real against generated; overlap: the share of generated voxels "
        "within the real 5-95% range (90% for the real set by construction). `voldit synthesize --qc` "
        "checks each volume the same way.",
        "",
        "| label | real median HU | real 5-95% | generated median HU | overlap | generated voxels |",
        "|---|---|---|---|---|---|",
    ]
    for label, e in per_label.items():
        lines.append(
            f"| {label} | {e['real_median']:.0f} | {e['real_p5']:.0f}..{e['real_p95']:.0f} | "
            f"{e['generated_median']:.0f} | {e['generated_inside']:.0%} | {e['generated_voxels']:,} |"
        )
    return lines


def _baselines_markdown(r: dict) -> list[str]:
    b = r["baselines"]
    halves = b["real_halves"]
    lines = [
        "## Against baselines",
        "",
        f"The set metrics again, for the generated set and three baselines, all measured with one {yardstick_line(r)}:",
        "",
        *(f"- {BASELINE_NAMES[name]}: {b[name]['about']}." for name in b),
        "",
        f"Half A: {', '.join(halves['half_a'])}. Half B: {', '.join(halves['half_b'])}.",
        "",
    ]
    table = baseline_table(r)
    lines += ["| " + " | ".join(row) + " |" for row in table[:1]]
    lines += ["|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    summary = baseline_summary(r)
    return [*lines, "", summary[0].upper() + summary[1:] + "."]
