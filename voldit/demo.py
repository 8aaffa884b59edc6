"""The pipeline so far, end to end on real CT with the tiny configs: crops -> VQ-GAN -> encode -> VolDiT -> TGCA.

Runs on an embedded local Ray in a few minutes on two CPU cores; every artefact lands under one folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from voldit.config import load_config
from voldit.data.examples import fetch_examples, write_crops

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _csv(path: Path, rows) -> Path:
    path.write_text("image,mask\n" + "\n".join(f"{ct},{seg}" for ct, seg in rows) + "\n")
    return path


def run_demo(output: str | Path, cache: str | Path, configs: Path = CONFIGS) -> dict[str, Path]:
    """Train the three stages on example CT crops; returns where each result went."""
    from voldit.distributed.encode import encode
    from voldit.distributed.train import train

    output = Path(output).resolve()
    start = time.perf_counter()
    rows = write_crops(output / "data" / "crops", fetch_examples(cache))
    train_csv, val_csv = (
        _csv(output / "data" / "train.csv", rows[:10]),
        _csv(output / "data" / "val.csv", rows[10:]),
    )
    runs = output / "runs"
    results: dict[str, Path] = {}
    print(f"[demo] {len(rows)} real CT crops (64x64x32, with organ masks) in {output / 'data'}")
    vq = train(
        load_config(configs / "vqgan.yaml"),
        "vqgan",
        str(train_csv),
        str(val_csv),
        name="vqgan",
        storage=str(runs),
        workers=1,
    )
    results["vqgan"] = vq.best
    print(f"[demo] VQ-GAN: validation L1 {vq.metrics['val_loss']:.4f} -> {vq.best}")
    for split, csv in (("train", train_csv), ("val", val_csv)):
        summary = encode(csv, results["vqgan"], output / "latents" / split, ["mask"], progress=False)
        if summary.failed:
            raise RuntimeError(f"encoding failed for {summary.failed}")
        results[f"latents_{split}"] = output / "latents" / split
    print(
        f"[demo] encoded {len(rows)} crops and masks -> {output / 'latents'} "
        f"(scale factor {summary.info.scale_factor:.3f})"
    )
    dit = train(
        load_config(configs / "dit.yaml"),
        "dit",
        str(results["latents_train"]),
        str(results["latents_val"]),
        name="dit",
        storage=str(runs),
        workers=1,
    )
    results["dit"] = dit.best
    print(f"[demo] VolDiT: validation loss {dit.metrics['val_loss']:.4f} -> {dit.best}")
    tgca = train(
        load_config(configs / "tgca.yaml"),
        "tgca",
        str(results["latents_train"]),
        str(results["latents_val"]),
        dit=str(dit.best),
        name="tgca",
        storage=str(runs),
        workers=1,
    )
    results["tgca"] = tgca.best
    print(f"[demo] TGCA: validation loss {tgca.metrics['val_loss']:.4f} -> {tgca.best}")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s; TensorBoard: tensorboard --logdir {runs}")
    return results
