import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import ROOT, kill_when
from voldit.data.latents import committed_ids, load_info, parts, read_latents, rescale_from_tensors
from voldit.data.manifest import ManifestError
from voldit.encode import Encoder


def _manifest(path, rows, header="image,mask"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_encoder_writes_latents_and_masks_of_real_ct(tmp_path, examples, tiny_vqgan_checkpoint):
    (image, mask), (image2, mask2) = examples["example_ct_sm"], examples["example_ct"]
    encoder = Encoder(tiny_vqgan_checkpoint, tmp_path / "out", ["mask"])
    status = encoder(
        {
            "id": np.array(["a", "b", "c"]),
            "image": np.array([str(image), str(image2), str(image)]),
            "mask": np.array([str(mask), str(mask2), str(mask2)]),
        }
    )
    assert status["error"][:2] == ["", ""] and "mask shape" in status["error"][2]  # c: mask of another CT
    data = read_latents(tmp_path / "out", ["id", "latent", "mask", "affine"])
    assert data["id"] == ["a", "b"]
    assert data["latent"].shape == (2, 8, 8, 8, 4) and data["latent"].dtype == np.float32
    assert data["mask"].shape == (2, 1, 64, 64, 32) and data["mask"].dtype == np.int16
    assert set(np.unique(data["mask"][0])) <= set(np.unique(nib.load(mask).get_fdata()).astype(int))


@pytest.mark.slow
def test_encode_is_deterministic_resumable_and_reports_bad_rows(
    tmp_path, examples, tiny_vqgan_checkpoint, ray_session
):
    from voldit.distributed.encode import encode

    (image, mask), (image2, mask2) = examples["example_ct_sm"], examples["example_ct"]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(image.read_bytes()[:5000])
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), flat)
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), np.nan, np.float32), np.eye(4)), nan)
    # A generated volume of another size: a water sphere in air, on an anisotropic 1 x 1 x 2.5 mm grid.
    grid = np.indices((100, 80, 40)).astype(np.float32)
    sphere = ((grid[0] - 50) ** 2 + (grid[1] - 40) ** 2 + (2.5 * (grid[2] - 20)) ** 2) < 30**2
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    phantom, phantom_mask = tmp_path / "phantom.nii.gz", tmp_path / "phantom_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.where(sphere, 0, -1000).astype(np.int16), affine), phantom)
    nib.save(nib.Nifti1Image(sphere.astype(np.uint8), affine), phantom_mask)
    rows = [
        (image, mask),
        (image2, mask2),
        (phantom, phantom_mask),
        (corrupt, mask),
        (flat, mask),
        (nan, mask),
        (image, mask2),
        (tmp_path / "missing.nii.gz", mask),
    ]
    csv = _manifest(tmp_path / "m.csv", rows)
    first = encode(csv, tiny_vqgan_checkpoint, tmp_path / "a", ["mask"], progress=False)
    assert (first.encoded, len(first.failed)) == (3, 5)
    reasons = {r["path"].split("/")[-1]: r["reason"] for r in first.failed}
    assert "not a readable NIfTI" in reasons["corrupt.nii.gz"]
    assert "expected a 3D volume" in reasons["flat.nii.gz"] and "NaN" in reasons["nan.nii.gz"]
    assert "cannot be read" in reasons["missing.nii.gz"] and "mask shape" in reasons["example_ct_sm.nii.gz"]
    assert (tmp_path / "a" / "errors.csv").read_text().count("\n") == 6  # header + 5 rows

    second = encode(csv, tiny_vqgan_checkpoint, tmp_path / "b", ["mask"], progress=False)
    a, b = (read_latents(tmp_path / d, ["id", "latent", "mask"]) for d in ("a", "b"))
    order_a, order_b = np.argsort(a["id"]), np.argsort(b["id"])
    assert np.array_equal(a["latent"][order_a], b["latent"][order_b])
    assert np.array_equal(a["mask"][order_a], b["mask"][order_b])
    assert second.info.scale_factor == first.info.scale_factor

    again = encode(csv, tiny_vqgan_checkpoint, tmp_path / "a", ["mask"], progress=False)
    assert (again.skipped, again.encoded) == (3, 0)  # only the bad rows were tried again
    info = load_info(tmp_path / "a")
    assert info.rows == 3 and info.latent_shape == [8, 8, 8, 4] and info.condition_keys == ["mask"]
    phantom_row = a["id"].index("phantom")
    assert set(np.unique(a["mask"][phantom_row])) == {0, 1}
    std = float(a["latent"].astype(np.float64).std())
    assert info.scale_factor == pytest.approx(1 / std, rel=1e-9)
    assert rescale_from_tensors(tmp_path / "a").scale_factor == pytest.approx(1 / std, rel=1e-9)


def test_manifest_structure_is_checked_before_work(tmp_path, tiny_vqgan_checkpoint, examples):
    from voldit.distributed.encode import encode

    csv = _manifest(tmp_path / "m.csv", [(examples["example_ct_sm"][0],)], header="image")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['mask'\]"):
        encode(csv, tiny_vqgan_checkpoint, tmp_path / "o", ["mask"], progress=False)


@pytest.mark.slow
def test_killed_encode_resumes_with_every_row_written_once(tmp_path, examples):
    # A slower VQ-GAN (wider channels) so the run can be killed part-way.
    from voldit.builders import build_vqgan
    from voldit.checkpoint import save_checkpoint
    from voldit.config import load_config

    cfg = load_config(
        ROOT / "configs" / "tiny" / "vqgan.yaml",
        overrides=["stage1.params.num_channels=[64,64,64]", "stage1.params.num_res_channels=[64,64,64]"],
    )
    vq = save_checkpoint(tmp_path / "vq", config=cfg, stage="vqgan", model=build_vqgan(cfg).state_dict())
    image = examples["example_ct"][0]
    rows = []
    for i in range(12):
        copy = tmp_path / f"ct_{i:02d}.nii.gz"
        shutil.copy(image, copy)
        rows.append((copy,))
    csv = _manifest(tmp_path / "m.csv", rows, header="image")
    out = tmp_path / "lat"
    command = [
        sys.executable,
        "-m",
        "voldit",
        "encode",
        "--csv",
        str(csv),
        "--vqgan",
        str(vq),
        "--output",
        str(out),
    ]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    kill_when(command, lambda: bool(parts(out)), env, timeout=120)
    written = committed_ids(out)
    assert 0 < len(written) < 12, "the run should have been killed part-way"
    assert not (out / "dataset.json").exists()

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(written)} already done" in result.stdout
    ids = read_latents(out, ["id"])["id"]
    assert sorted(ids) == [f"ct_{i:02d}" for i in range(12)]  # every row exactly once
    assert not list(out.glob(".*tmp"))
    assert load_info(out).rows == 12


def test_asking_for_absent_gpus_fails_at_once(tmp_path, examples, tiny_vqgan_checkpoint, ray_session):
    from voldit.distributed.encode import encode
    from voldit.distributed.runtime import GPUUnavailable

    csv = _manifest(tmp_path / "m.csv", [(examples["example_ct_sm"][0],)], header="image")
    with pytest.raises(GPUUnavailable, match="use --gpus-per-worker 0"):
        encode(csv, tiny_vqgan_checkpoint, tmp_path / "o", gpus_per_worker=1000, progress=False)
