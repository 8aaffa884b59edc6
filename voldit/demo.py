"""The whole pipeline in one call: VQ-GAN -> encode -> VolDiT -> unconditional samples -> TGCA -> one
synthetic volume per mask -> evaluation report.

`voldit pipeline` runs it on your CSVs and configs (locally or as `jobs/pipeline.py` on a cluster);
`voldit demo` runs it on real example CT with the tiny configs, in a few minutes on two CPU cores.
Every artefact lands under one output folder (or ``s3://`` prefix).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from voldit import storage
from voldit.config import load_config
from voldit.data.examples import fetch_examples, write_sections
from voldit.errors import VolditError
from voldit.qc import QCThresholds, settings_dict
from voldit.synthesis import qc_line

log = logging.getLogger(__name__)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
TINY_CONFIGS = {"vqgan": TINY / "vqgan.yaml", "dit": TINY / "dit.yaml", "tgca": TINY / "tgca.yaml"}


VALIDATION = (3, 8)  # of the 12 example sections: inner ones, whose neighbours cover their slices


class PipelineError(VolditError, RuntimeError):
    """A pipeline step that left nothing for the next one (every row of a CSV failed)."""

    exit_code = 1  # rows failed, each with its reason


# The quality gate of the pipeline's synthesis: voldit.qc's default thresholds and two more samplings.
DEFAULT_QC = settings_dict(QCThresholds())


def _csv(path: Path, rows, header: str = "image,mask") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def run_pipeline(
    train_csv: str,
    val_csv: str,
    masks_csv: str,
    output: str | Path,
    configs: dict[str, str | Path] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    overrides: Sequence[str] = (),
    samples: int = 4,
    say=print,
    qc: dict | None = DEFAULT_QC,
    synthesis: dict | None = None,
) -> dict:
    """Train all three stages on ``train_csv``/``val_csv`` (image,mask), then sample, synthesise one
    volume per row of ``masks_csv`` and, for a local output, evaluate against the validation CTs.
    ``overrides`` (key=value) apply to every stage's config. Re-running resumes every step. Synthesis
    runs the quality gate ``qc`` (None: off) with the ``synthesis`` keywords of `synthesize`
    (field_of_view, label_map, allow_unseen_labels).

    Rows that fail (an unreadable CT, a mask the model cannot take) are reported and the rest go on:
    ``results["failed"]`` lists them ({step, id, reason}) and the report names them too."""
    from voldit.distributed.encode import encode
    from voldit.distributed.synthesize import synthesize
    from voldit.distributed.train import train
    from voldit.sampling import write_samples

    configs = {**TINY_CONFIGS, **(configs or {})}
    output = storage.resolve(output)
    for url, what in ((output, "output"), (train_csv, "training CSV"), (val_csv, "validation CSV")):
        storage.check(url, what)
    start = time.perf_counter()
    runs = storage.join(output, "runs")
    common = dict(storage=runs, workers=workers, gpus_per_worker=gpus_per_worker)
    results: dict = {"failed": []}

    def failed(step: str, rows: list[dict], key: str) -> None:
        for row in rows:
            results["failed"].append({"step": step, "id": row["id"], "reason": row[key]})
            if len(results["failed"]) <= 10:
                say(f"[pipeline]   {step} failed for {row['id']}: {row[key]}")

    def cfg(stage):
        return load_config(configs[stage], overrides=list(overrides))

    vq = train(cfg("vqgan"), "vqgan", train_csv, val_csv, name="vqgan", **common)
    results["vqgan"] = str(vq.best)
    say(f"[pipeline] VQ-GAN: validation L1 {vq.metrics['val_loss']:.4f} -> {vq.best}")
    for split, csv in (("train", train_csv), ("val", val_csv)):
        latents = storage.join(output, "latents", split)
        summary = encode(csv, results["vqgan"], latents, ["mask"], workers=workers,
                         gpus_per_worker=gpus_per_worker, progress=False)  # fmt: skip
        failed(f"encoding ({split})", summary.failed, "reason")
        if summary.info is None:
            raise PipelineError(
                f"no row of {csv} could be encoded; see {storage.join(latents, 'errors.csv')}"
            )
        results[f"latents_{split}"] = latents
    say(f"[pipeline] encoded images and masks -> {storage.join(output, 'latents')} "
        f"(scale factor {summary.info.scale_factor:.3f})")  # fmt: skip
    latents = (results["latents_train"], results["latents_val"])
    dit = train(cfg("dit"), "dit", *latents, name="dit", **common)
    results["dit"] = str(dit.best)
    say(f"[pipeline] VolDiT: validation loss {dit.metrics['val_loss']:.4f} -> {dit.best}")
    if samples:
        results["samples"] = storage.join(output, "samples")
        import pandas as pd

        # A real CT's orientation and spacing.
        reference = pd.read_csv(io.BytesIO(storage.read_bytes(train_csv)), dtype=str)["image"].iloc[0]
        write_samples(dit.best, results["samples"], samples, reference=reference, progress=False)
        say(f"[pipeline] {samples} unconditional volumes (DDPM-300) -> {results['samples']}")
    tgca = train(cfg("tgca"), "tgca", *latents, dit=str(dit.best), name="tgca", **common)
    results["tgca"] = str(tgca.best)
    say(f"[pipeline] TGCA: validation loss {tgca.metrics['val_loss']:.4f} -> {tgca.best}")
    results["synthetic"] = storage.join(output, "synthetic")
    summary = synthesize(masks_csv, tgca.best, results["synthetic"], batch_size=4, workers=workers,
                         gpus_per_worker=gpus_per_worker, progress=False, qc=qc, **(synthesis or {}))  # fmt: skip
    unmade = [row for row in summary.failed if row["status"] != "qc_failed"]
    made = summary.total - len(unmade)  # volumes written, whether they passed the gate or not
    say(f"[pipeline] {made} of {summary.total} volumes, one per mask (DDPM-300) -> "
        f"{storage.join(results['synthetic'], 'volumes')}; previews: {summary.contact_sheet}")  # fmt: skip
    if summary.qc:
        say(f"[pipeline] {qc_line(summary.qc)}")
    failed("synthesis", unmade, "error")
    if not made:
        raise PipelineError(f"no volume was synthesised; see the reasons in {summary.manifest}")
    if not storage.is_remote(output):
        results["report"] = _evaluate(results, val_csv, train_csv, output, say)
    say(f"[pipeline] done in {time.perf_counter() - start:.0f} s; TensorBoard: tensorboard --logdir {runs}")
    return results


def _evaluate(results: dict, val_csv: str, train_csv: str, output: str, say) -> str:
    import pandas as pd

    from voldit.report import write_report

    frames = [pd.read_csv(csv, dtype=str) for csv in (train_csv, val_csv)]
    real = Path(output) / "data" / "real.csv"
    real.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames)[["image", "mask"]].to_csv(real, index=False)
    report = str(Path(output) / "report")
    scores = write_report(
        results["synthetic"], real, report, vqgan=results["vqgan"], failed=results["failed"]
    )
    h, f = scores["hu_histogram"], scores.get("mask_fidelity", {})
    say(
        f"[pipeline] evaluation against {scores['real']['volumes']} real CTs: HU histogram Wasserstein "
        f"{h['wasserstein_hu']:.0f} HU, MMD^2 {scores['mmd']['mmd2']:.3f}, VQ-GAN Frechet distance "
        f"{scores['vqgan_frechet_distance']['value']:.3g}, tissue Dice {f.get('tissue_dice_mean') or 0:.3f} "
        f"(real CTs: {f.get('tissue_dice_real') or 0:.3f}) -> {report}/report.md"
    )
    return report


def example_data(output: str | Path, cache: str | Path) -> tuple[str, str, str]:
    """Twelve real whole-body CT sections with organ masks from the TotalSegmentator example, stored on
    three grids (RAS and LPS at 3 mm, RAS at 3x3x6 mm): ten for training, two inner ones for validation
    (their organs all appear in the training sections, so every mask's labels are known), and every
    section's mask to synthesise from; the tiny configs resample them all to 6 mm RAS. For an s3:// output they
    are uploaded under ``<output>/data`` and the CSVs name their URLs, so every node can read them."""
    remote = str(output).rstrip("/") if storage.is_remote(output) else None
    local = Path(output) if not remote else storage.staging_dir("demo", remote)
    data = local / "data"
    rows = write_sections(data / "sections", fetch_examples(cache))
    if remote:
        storage.sync_dir(data / "sections", storage.join(remote, "data", "sections"))
        rows = [
            tuple(storage.join(remote, "data", Path(p).relative_to(data).as_posix()) for p in r) for r in rows
        ]
    masks = _csv(data / "masks.csv", [(Path(seg).name.split(".")[0], seg) for _, seg in rows], "id,mask")
    val = [rows[k] for k in VALIDATION]
    csvs = [_csv(data / "train.csv", [r for r in rows if r not in val]), _csv(data / "val.csv", val), masks]
    if remote:
        return tuple(storage.upload(c, storage.join(remote, "data", c.name)) for c in csvs)
    return tuple(str(c) for c in csvs)


def run_demo(
    output: str | Path, cache: str | Path, overrides: Sequence[str] = (), **pipeline
) -> dict[str, str]:
    """The pipeline on the example CT sections with the tiny configs; returns where each result went.
    ``pipeline`` keywords (workers, gpus_per_worker) go to `run_pipeline`."""
    output = storage.resolve(output)  # a local folder made absolute, or an s3:// URL unchanged
    train_csv, val_csv, masks = example_data(output, cache)
    print(
        f"[demo] 12 real whole-body CT sections with organ masks, on three grids (RAS and LPS at 3 mm, "
        f"RAS at 3x3x6 mm), in {storage.join(output, 'data')}"
    )
    return run_pipeline(train_csv, val_csv, masks, output, overrides=overrides, **pipeline)
