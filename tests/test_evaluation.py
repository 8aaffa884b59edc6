"""`voldit evaluate`: each metric against a hand-computed value, identical sets, noise, and the baselines
and yardstick that make scores comparable."""

import contextlib
import io
import itertools
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import write_csv
from voldit.data.intensity import hu_counts, hu_edges
from voldit.data.nifti import read_volume
from voldit.evaluation import (
    HU_BIN,
    EvaluationError,
    evaluate,
    frechet_distance,
    histogram_distances,
    label_medians,
    label_tissues,
    load_items,
    mask_dice,
    measure,
    median_distance,
    mmd,
    ms_ssim_pairs,
    noise_volumes,
    real_halves,
    resize,
)
from voldit.synthesis import Layout, manifest_frame, write_manifest


def _density(volumes: np.ndarray) -> np.ndarray:
    """The pooled HU histogram of a volume (or a stack of them): (bins,) summing to 1."""
    return hu_counts(volumes, HU_BIN) / volumes.size


def test_hu_histogram_distances_by_hand():
    p = _density(np.full((4, 4, 4), -990.0))  # all in the first 20-HU bin
    q = _density(np.full((2, 2, 2), -950.0))  # all in the third
    edges = hu_edges(HU_BIN)
    assert edges[0] == -1000 and edges[-1] == 1000 and len(p) == 100
    distances = histogram_distances(p, q)
    assert distances["wasserstein_hu"] == pytest.approx(40.0)  # the mass moves two bins of 20 HU
    assert distances["js_divergence"] == pytest.approx(1.0)  # disjoint: one bit
    assert histogram_distances(p, p) == {"wasserstein_hu": 0.0, "js_divergence": 0.0}


def test_mmd_by_hand():
    x, y = np.zeros((2, 1)), np.ones((2, 1))
    assert mmd(x, y, 1.0) == pytest.approx(2 - 2 * np.exp(-0.5))
    assert mmd(x, y, 2.0) == pytest.approx(2 - 2 * np.exp(-1 / 8))
    assert mmd(x, x, 1.0) == 0.0
    # Distances 3, 4 and 5 (a 3-4-5 triangle) plus a repeated point, whose zero distance is left out.
    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    assert median_distance(points) == 4.0
    assert median_distance(np.ones((3, 5))) is None


def test_frechet_distance_by_hand():
    a, b = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])  # means 1, 3; variances 2, 8
    assert frechet_distance(a, b) == pytest.approx((1 - 3) ** 2 + 2 + 8 - 2 * np.sqrt(2 * 8))
    features = np.random.default_rng(0).normal(size=(6, 4))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_ms_ssim_diversity():
    g = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 32, 32, 32, generator=g) * 2 - 1
    smooth = torch.nn.functional.avg_pool3d(volume[None], 5, 1, 2)[0]
    assert ms_ssim_pairs([smooth, smooth.clone()], [(0, 1)]) == pytest.approx([1.0], abs=1e-5)
    others = [torch.rand(1, 32, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    pairs = list(itertools.combinations(range(3), 2))
    assert ms_ssim_pairs(others, pairs).mean() < 0.1  # independent noise shares no structure
    assert measure(["one"], [np.zeros((8, 8, 8))], (8, 8, 8)).diversity() is None  # no pair to measure


def test_a_synthesis_folder_gives_the_volumes_it_wrote(tmp_path):
    """Rows whose volume was written, gate passed or not, each with its mask; failed rows have none."""
    layout = Layout.of(tmp_path / "synthetic")
    frame = pd.DataFrame({"id": ["a", "b", "c"], "name": ["a", "b", "c"], "seed": [1, 2, 3]})
    frame["organs"] = ["ma.nii.gz", "mb.nii.gz", "mc.nii.gz"]
    records = {
        "a": {"status": "ok", "output": "a.nii.gz"},
        "b": {"status": "qc_failed", "output": "b.nii.gz"},
    }
    write_manifest(
        manifest_frame(frame, {**records, "c": {"status": "failed"}}, ["organs"]), layout.manifest()
    )
    items = load_items(tmp_path / "synthetic")
    assert [(i.id, i.image, i.mask) for i in items] == [
        ("a", "a.nii.gz", "ma.nii.gz"),
        ("b", "b.nii.gz", "mb.nii.gz"),
    ]


def test_mask_fidelity_by_hand():
    mask = np.array([1, 1, 2, 2, 0])
    real = np.array([-900.0, -800.0, 400.0, 300.0, 0.0])
    tissues = label_tissues([(real, mask)])
    assert tissues == {1: 0, 2: 2}  # label 1 is air, label 2 bone
    generated = np.array([-900.0, 0.0, 500.0, 500.0, -1000.0])  # one air voxel came out soft tissue
    # air: expected {0, 1}, found {0} -> 2/3; bone: {2, 3} both -> 1; the unlabelled voxel is ignored.
    assert mask_dice(generated, mask, tissues) == pytest.approx((2 / 3 + 1) / 2)
    assert label_medians([(generated, mask)]) == {1: -450.0, 2: 500.0}
    assert mask_dice(generated, np.zeros(5, int), tissues) is None


@pytest.fixture(scope="module")
def real_set(crops, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    rows = crops["rows"][:6]
    return write_csv(folder / "real.csv", rows), rows


def _noise_set(rows, folder, kind):
    rng = np.random.default_rng(0)
    folder.mkdir()
    out = []
    for k, (image, mask) in enumerate(rows):
        ct = nib.load(image)
        data = np.asarray(ct.dataobj).astype(np.int16)
        noisy = (
            rng.permutation(data.ravel()).reshape(data.shape)
            if kind == "shuffled"
            else rng.integers(-1000, 1000, data.shape)
        )
        path = folder / f"g{k}.nii.gz"
        nib.save(nib.Nifti1Image(noisy.astype(np.int16), ct.affine), path)
        out.append((path, mask))
    return write_csv(folder / "gen.csv", out)


@pytest.fixture(scope="module")
def runs(real_set, crop_latents, tmp_path_factory):
    """The real set evaluated against itself and against two noise sets of as many volumes."""
    csv, rows = real_set
    folder = tmp_path_factory.mktemp("runs")
    vqgan = crop_latents["vqgan"]
    return {
        "same": evaluate(csv, csv, vqgan=vqgan)[0],
        "shuffled": evaluate(_noise_set(rows, folder / "s", "shuffled"), csv, vqgan=vqgan)[0],
        "uniform": evaluate(_noise_set(rows, folder / "u", "uniform"), csv, vqgan=vqgan)[0],
    }


def test_identical_sets_score_as_identical_and_noise_far_worse(real_set, runs, tmp_path):
    csv, rows = real_set
    same, shuffled, uniform = runs["same"], runs["shuffled"], runs["uniform"]
    assert same["hu_histogram"] == {"wasserstein_hu": 0.0, "js_divergence": 0.0}
    assert same["mmd"]["mmd2"] == 0.0
    assert same["vqgan_frechet_distance"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["ms_ssim_diversity"]["generated"] == same["ms_ssim_diversity"]["real"]
    assert same["mask_fidelity"]["label_median_hu_abs_error"] == 0.0
    fidelity = same["mask_fidelity"]
    assert fidelity["tissue_dice_mean"] == fidelity["tissue_dice_real"] > 0.5  # the real CTs' own score
    # Per label (the quality gate's measures): the real set against itself overlaps its own 5-95% range
    # by about 90%; uniform noise puts most of an organ's voxels outside it.
    per_label = fidelity["per_label"]
    assert len(per_label) >= 5 and "0" in per_label
    for entry in per_label.values():
        assert entry["generated_median"] == entry["real_median"]
        assert 0.75 <= entry["generated_inside"] <= 1.0  # small labels: few distinct HU values
    assert np.mean([e["generated_inside"] for e in per_label.values()]) == pytest.approx(0.9, abs=0.04)
    noisy = runs["uniform"]["mask_fidelity"]["per_label"]
    organs = [k for k in noisy if k != "0"]
    assert organs and all(noisy[k]["generated_inside"] < per_label[k]["generated_inside"] for k in organs)
    assert np.mean([noisy[k]["generated_inside"] for k in organs]) < 0.2

    # Shuffling voxels keeps each volume's HU histogram (so that distance stays 0) but destroys anatomy.
    assert shuffled["hu_histogram"]["wasserstein_hu"] == pytest.approx(0.0, abs=1e-9)
    assert uniform["hu_histogram"]["wasserstein_hu"] > 100
    # A collapsed generator (one volume over and over) shows in the diversity: MS-SSIM 1 within the set.
    collapsed = write_csv(tmp_path / "collapsed.csv", [rows[0]] * 4)
    collapse, _ = evaluate(collapsed, csv)
    assert collapse["ms_ssim_diversity"]["generated"] == pytest.approx(1.0, abs=1e-5)
    assert collapse["ms_ssim_diversity"]["real"] < 0.5
    for noise in (shuffled, uniform):
        assert noise["mmd"]["mmd2"] > 0.1
        assert noise["vqgan_frechet_distance"]["value"] > 100 * (
            same["vqgan_frechet_distance"]["value"] + 1e-3
        )
        assert noise["mask_fidelity"]["tissue_dice_mean"] < same["mask_fidelity"]["tissue_dice_mean"] - 0.2


def test_the_yardstick_comes_from_the_real_set_alone(real_set, runs):
    _, rows = real_set
    same, uniform = runs["same"], runs["uniform"]
    # Two different generated sets against one real set: the same yardstick, hence comparable scores.
    assert same["yardstick"] == uniform["yardstick"]
    assert same["mmd"]["bandwidth"] == uniform["mmd"]["bandwidth"] == same["yardstick"]["mmd_bandwidth"]
    grid = [resize(read_volume(image).array, same["grid"]).flatten().double().numpy() for image, _ in rows]
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(grid, 2)]
    assert same["yardstick"]["mmd_bandwidth"] == pytest.approx(np.median(distances))
    # The baselines depend on the real set, the seed and the number of generated volumes only.
    assert same["baselines"] == uniform["baselines"]


def test_a_set_drawn_from_the_real_volumes_beats_every_baseline(runs):
    same = runs["same"]
    assert all(all(v.values()) for v in same["generated_beats"].values())
    floor = same["baselines"]["real_halves"]
    assert len(floor["half_a"]) == len(floor["half_b"]) == 3
    assert not set(floor["half_a"]) & set(floor["half_b"])
    # HU-histogram noise matches the real histogram by construction; only structure tells it apart.
    histogram = same["baselines"]["histogram_noise"]["scores"]
    assert histogram["wasserstein_hu"] < 1 and histogram["js_divergence"] < 1e-3
    # Noise as the generated set does not reach the floor on the distances that see structure.
    for noise in (runs["shuffled"], runs["uniform"]):
        assert not noise["generated_beats"]["mmd2"]["real_halves"]
        assert not noise["generated_beats"]["vqgan_frechet_distance"]["real_halves"]


def test_noise_baselines_are_reproducible_from_the_seed():
    density = _density(np.linspace(-1000, -1, 1000))  # the lower half of the HU range
    for kind in ("histogram", "uniform"):
        drawn = noise_volumes(kind, density, 3, (8, 8, 4), seed=0)
        assert drawn.shape == (3, 8, 8, 4)
        np.testing.assert_array_equal(drawn, noise_volumes(kind, density, 3, (8, 8, 4), seed=0))
        assert not np.array_equal(drawn, noise_volumes(kind, density, 3, (8, 8, 4), seed=1))
    histogram = noise_volumes("histogram", density, 4, (32, 32, 32), seed=0)
    assert -1000 <= histogram.min() and histogram.max() <= 0
    assert histogram_distances(_density(histogram), density)["wasserstein_hu"] < 1
    # Uniform over [-1000, 1000] HU against uniform over [-1000, 0]: the CDFs differ by 250 HU on each half.
    uniform = noise_volumes("uniform", density, 4, (32, 32, 32), seed=0)
    assert histogram_distances(_density(uniform), density)["wasserstein_hu"] == pytest.approx(500, rel=0.01)
    a, b = real_halves(7, seed=0)
    assert (a, b) == real_halves(7, seed=0) and len(a) == 3 and sorted(a + b) == list(range(7))
    assert any(real_halves(7, seed) != (a, b) for seed in range(1, 4))


def test_the_real_set_needs_two_different_volumes(real_set, tmp_path):
    _, rows = real_set
    with pytest.raises(EvaluationError, match="at least two"):
        evaluate(write_csv(tmp_path / "one.csv", rows[:1]), write_csv(tmp_path / "r1.csv", rows[:1]))
    with pytest.raises(EvaluationError, match="all the same"):
        evaluate(write_csv(tmp_path / "one.csv", rows[:1]), write_csv(tmp_path / "r2.csv", rows[:1] * 2))


@pytest.fixture(scope="module")
def held_out(real_set, crops, crop_latents, tmp_path_factory):
    """`voldit evaluate` of six real crops the real set does not hold: (its exit code, stdout, report folder)."""
    from voldit.cli import main

    csv, _ = real_set
    folder = tmp_path_factory.mktemp("held_out")
    gen, out = write_csv(folder / "held_out.csv", crops["rows"][6:12]), folder / "report"
    args = [
        "--generated",
        str(gen),
        "--real",
        str(csv),
        "--output",
        str(out),
        "--vqgan",
        str(crop_latents["vqgan"]),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["evaluate", *args])
    return code, printed.getvalue(), out


def test_real_volumes_the_real_set_lacks_beat_the_noise(held_out):
    _, _, out = held_out
    beats = json.loads((out / "evaluation.json").read_text())["generated_beats"]
    # Anatomy beats noise wherever the metric can see structure; the histogram noise matches the
    # real histogram by construction, so there only the structure metrics can tell.
    for metric in ("wasserstein_hu", "js_divergence", "mmd2", "vqgan_frechet_distance"):
        assert beats[metric]["uniform_noise"], metric
    for metric in ("mmd2", "vqgan_frechet_distance"):
        assert beats[metric]["histogram_noise"], metric


def test_evaluate_command_writes_the_report(real_set, held_out, tmp_path):
    from voldit.cli import main

    csv, _ = real_set
    code, printed, out = held_out
    assert code == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert {
        "hu_histogram",
        "mmd",
        "ms_ssim_diversity",
        "vqgan_frechet_distance",
        "mask_fidelity",
        "yardstick",
        "baselines",
        "generated_beats",
    } <= set(results)
    assert set(results["baselines"]) == {"real_halves", "histogram_noise", "uniform_noise"}
    report = (out / "report.md").read_text()
    for name in ("hu_histogram.png", "mask_dice.png", "generated_previews.png", "real_previews.png"):
        assert (out / name).is_file() and name in report
    # Printed and in the report: each baseline's score and which baselines the generated set beats.
    for text in (printed, report):
        assert "MMD bandwidth" in text and "generated beats" in text and "uniform noise on" in text
        assert "real half A vs B" in text and "HU-histogram noise" in text
    for half in results["baselines"]["real_halves"]["half_a"]:
        assert half in report
    assert "## Per label" in report
    assert all(f"| {label} |" in report for label in results["mask_fidelity"]["per_label"])
    assert (
        main(
            [
                "evaluate",
                "--generated",
                str(tmp_path / "nothing.txt"),
                "--real",
                str(csv),
                "--output",
                str(tmp_path / "report"),
            ]
        )
        == 2
    )
