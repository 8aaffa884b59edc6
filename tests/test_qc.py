"""The quality gate of bulk synthesis (voldit.qc) on real CT: reference statistics from the real crops and
their label maps, real volumes passing their own gate, a shifted organ failing, and the synthesizer
sampling again with the next seed when a volume fails."""

import json

import numpy as np
import pytest

from voldit import qc
from voldit.data.nifti import read_volume


def _real(crops):
    return [
        (read_volume(image).array, read_volume(mask, dtype=None).array.astype(np.int64))
        for image, mask in crops["rows"]
    ]


def _reference(volumes):
    total: dict = {}
    for hu, labels in volumes:
        qc.add_histograms(total, "mask", qc.label_histograms(hu, labels))
    return qc.reference(total)["mask"]


def test_percentiles_and_the_reference_add_up_over_rows_in_any_order():
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 30, size=(32, 32, 16)).astype(np.float32)
    labels = (np.arange(hu.size).reshape(hu.shape) % 3).astype(np.int64)
    ref = _reference([(hu, labels)])
    for value in range(3):
        voxels = hu[labels == value]
        for name, q in (("median", 50), ("p5", 5), ("p95", 95)):
            assert abs(ref[str(value)][name] - np.percentile(voxels, q)) <= qc.BIN_HU  # within a bin
        assert ref[str(value)]["voxels"] == voxels.size
    halves = [(hu[:16], labels[:16]), (hu[16:], labels[16:])]
    assert _reference(halves) == ref == _reference(halves[::-1])


def test_real_volumes_pass_their_own_gate_and_a_shifted_organ_fails(crops):
    volumes = _real(crops)
    ref = _reference(volumes[:10])  # two crops stay out of the reference
    thresholds = qc.QCThresholds()
    for hu, labels in volumes:
        result = qc.score(hu, labels, ref, thresholds)
        assert result["passed"], result["failed"]
    hu, labels = volumes[11]
    judged = [v for v, e in qc.score(hu, labels, ref, thresholds)["labels"].items() if e["passed"]]
    organ = max((v for v in judged if v), key=lambda v: (labels == v).sum())  # the largest organ in view
    shifted = hu.copy()
    shifted[labels == organ] += 300
    result = qc.score(shifted, labels, ref, thresholds)
    assert not result["passed"]
    assert [r.split(":")[0] for r in result["failed"]] == [f"label {organ}"]
    assert "outside the real" in result["failed"][0]


def test_the_ranges_come_from_the_reference_not_from_constants(crops):
    hu, labels = _real(crops)[0]
    ref = _reference([(hu, labels)])
    moved = {k: {**v, "p5": v["p5"] + 300, "p95": v["p95"] + 300} for k, v in ref.items()}
    assert qc.score(hu, labels, ref, qc.QCThresholds())["passed"]
    assert not qc.score(hu, labels, moved, qc.QCThresholds())["passed"]
    few = qc.QCThresholds(min_voxels=10**9)  # nothing has that many voxels: nothing is judged
    assert qc.score(hu, labels, moved, few)["passed"]
    with pytest.raises(ValueError, match="min_inside"):
        qc.QCThresholds(min_inside=1.5)


def test_encode_records_the_reference_and_the_tgca_carries_it(crop_latents, tiny_tgca_run):
    from voldit.checkpoint import load_checkpoint
    from voldit.data.latents import load_info

    info = load_info(crop_latents["train"])
    ref = info.hu_reference["mask"]
    assert set(ref) == {"0", *map(str, info.labels["mask"])}  # every label, and the background
    assert all(e["p5"] <= e["median"] <= e["p95"] and e["voxels"] > 0 for e in ref.values())
    assert sum(e["voxels"] for e in ref.values()) == 10 * 64 * 64 * 32  # every voxel of the 10 crops
    assert load_checkpoint(tiny_tgca_run["tgca"]).meta["hu_reference"] == info.hu_reference


@pytest.mark.deadline(300)
def test_a_volume_that_fails_the_gate_is_sampled_again_with_the_next_seed(tiny_tgca_run, crops, tmp_path):
    from voldit.data.nifti import read_volume
    from voldit.synthesis import Journal, Layout, Synthesizer

    mask = str(crops["rows"][0][1])
    batch = {"id": np.array(["a"]), "name": np.array(["a"]), "seed": np.array([7]), "mask": np.array([mask])}
    fast = {"sampler": "ddim", "steps": 2}
    strict = {"min_voxels": 1, "min_inside": 1.0, "retries": 2}  # every voxel in range: a tiny model fails
    gated = Synthesizer(tiny_tgca_run["tgca"], tmp_path / "gated", settings=fast, qc=strict)
    result = gated(batch)
    record = json.loads(result["record"][0])
    assert record["status"] == "qc_failed" and result["error"] == [""]
    assert [a["seed"] for a in record["qc"]] == [7, 8, 9] and record["seed"] == 9
    assert "quality gate failed 3 time(s): label" in record["error"]
    assert all(not a["passed"] and a["failed"] for a in record["qc"])
    # The volume kept is the last attempt's: the one a plain run makes with seed 9.
    plain = Synthesizer(tiny_tgca_run["tgca"], tmp_path / "plain", settings=fast)
    plain({**batch, "seed": np.array([9])})
    volumes = [read_volume(tmp_path / d / "volumes" / "a.nii.gz").array for d in ("gated", "plain")]
    np.testing.assert_array_equal(*volumes)
    # Failing the gate after its retries is final: a resumed run skips the row.
    assert Journal.open(Layout.of(tmp_path / "gated"), ["a"]).done() == {"a"}


def test_the_tgca_config_turns_the_gate_on_and_flags_override_it(tmp_path):
    from tests.conftest import CONFIGS
    from voldit.builders import build_tgca
    from voldit.checkpoint import save_checkpoint
    from voldit.cli import build_parser
    from voldit.cli.generate import _qc
    from voldit.config import ConfigError, load_config

    def saved(*overrides):
        cfg = load_config(
            CONFIGS / "tiny" / "dit.yaml", CONFIGS / "tiny" / "tgca.yaml", overrides=list(overrides)
        )
        path = tmp_path / f"tgca{len(list(tmp_path.iterdir()))}"
        return save_checkpoint(path, config=cfg, stage="tgca", model=build_tgca(cfg).state_dict())

    def settings(checkpoint, *flags):
        args = build_parser().parse_args(
            ["synthesize", "--csv", "m.csv", "--tgca", str(checkpoint), "--output", "o", *flags]
        )
        return _qc(args)

    default = saved()
    assert settings(default) is None  # off unless the config or --qc turns it on
    assert settings(default, "--qc") == qc.settings_dict(qc.QCThresholds())
    gated = saved("tgca.qc.enabled=true", "tgca.qc.min_inside=0.7", "tgca.qc.retries=1")
    assert settings(gated) == {"min_voxels": 100, "min_inside": 0.7, "retries": 1}
    assert settings(gated, "--qc-retries", "3") == {"min_voxels": 100, "min_inside": 0.7, "retries": 3}
    assert settings(gated, "--no-qc") is None
    with pytest.raises(ConfigError, match="tgca.qc"):
        load_config(
            CONFIGS / "tiny" / "dit.yaml",
            CONFIGS / "tiny" / "tgca.yaml",
            overrides=["tgca.qc.min_inside=1.5"],
        )
