"""`voldit evaluate`: each metric against a hand-computed value, identical sets, and noise."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import write_csv
from voldit.evaluation import (
    frechet_distance,
    histogram_distances,
    hu_histogram,
    label_medians,
    label_tissues,
    mask_dice,
    mmd,
    ms_ssim_diversity,
)


def test_hu_histogram_distances_by_hand():
    p, edges = hu_histogram([np.full((4, 4, 4), -990.0)])  # all in the first 20-HU bin
    q, _ = hu_histogram([np.full((2, 2, 2), -950.0)])  # all in the third
    assert edges[0] == -1000 and edges[-1] == 1000 and len(p) == 100
    distances = histogram_distances(p, q)
    assert distances["wasserstein_hu"] == pytest.approx(40.0)  # the mass moves two bins of 20 HU
    assert distances["js_divergence"] == pytest.approx(1.0)  # disjoint: one bit
    assert histogram_distances(p, p) == {"wasserstein_hu": 0.0, "js_divergence": 0.0}


def test_mmd_by_hand():
    x, y = np.zeros((2, 1)), np.ones((2, 1))
    value, bandwidth = mmd(x, y)
    assert bandwidth == 1.0  # median of the non-zero pairwise distances
    assert value == pytest.approx(2 - 2 * np.exp(-0.5))
    assert mmd(x, x)[0] == 0.0


def test_frechet_distance_by_hand():
    a, b = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])  # means 1, 3; variances 2, 8
    assert frechet_distance(a, b) == pytest.approx((1 - 3) ** 2 + 2 + 8 - 2 * np.sqrt(2 * 8))
    features = np.random.default_rng(0).normal(size=(6, 4))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_ms_ssim_diversity():
    g = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 32, 32, 32, generator=g) * 2 - 1
    smooth = torch.nn.functional.avg_pool3d(volume[None], 5, 1, 2)[0]
    assert ms_ssim_diversity([smooth, smooth.clone()]) == pytest.approx(1.0, abs=1e-5)
    others = [torch.rand(1, 32, 32, 32, generator=g) * 2 - 1 for _ in range(3)]
    assert ms_ssim_diversity(others) < 0.1  # independent noise shares no structure
    assert ms_ssim_diversity([smooth]) is None


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


def test_identical_sets_score_as_identical_and_noise_far_worse(real_set, crop_latents, tmp_path):
    from voldit.evaluation import evaluate

    csv, rows = real_set
    same, _ = evaluate(csv, csv, vqgan=crop_latents["vqgan"])
    assert same["hu_histogram"] == {"wasserstein_hu": 0.0, "js_divergence": 0.0}
    assert same["mmd"]["mmd2"] == 0.0
    assert same["vqgan_frechet_distance"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["ms_ssim_diversity"]["generated"] == same["ms_ssim_diversity"]["real"]
    assert same["mask_fidelity"]["label_median_hu_abs_error"] == 0.0
    fidelity = same["mask_fidelity"]
    assert fidelity["tissue_dice_mean"] == fidelity["tissue_dice_real"] > 0.5  # the real CTs' own score

    shuffled, _ = evaluate(_noise_set(rows, tmp_path / "s", "shuffled"), csv, vqgan=crop_latents["vqgan"])
    uniform, _ = evaluate(_noise_set(rows, tmp_path / "u", "uniform"), csv, vqgan=crop_latents["vqgan"])
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


def test_evaluate_command_writes_the_report(real_set, crop_latents, tmp_path):
    from voldit.cli import main

    csv, rows = real_set
    out = tmp_path / "report"
    gen = _noise_set(rows, tmp_path / "g", "shuffled")
    assert (
        main(
            [
                "evaluate",
                "--generated",
                str(gen),
                "--real",
                str(csv),
                "--output",
                str(out),
                "--vqgan",
                str(crop_latents["vqgan"]),
            ]
        )
        == 0
    )
    results = json.loads((out / "evaluation.json").read_text())
    assert {"hu_histogram", "mmd", "ms_ssim_diversity", "vqgan_frechet_distance", "mask_fidelity"} <= set(
        results
    )
    report = (out / "report.md").read_text()
    for name in ("hu_histogram.png", "mask_dice.png", "generated_previews.png", "real_previews.png"):
        assert (out / name).is_file() and name in report
    assert (
        main(
            [
                "evaluate",
                "--generated",
                str(tmp_path / "nothing.txt"),
                "--real",
                str(csv),
                "--output",
                str(out),
            ]
        )
        == 2
    )
