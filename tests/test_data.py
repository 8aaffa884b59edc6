import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from voldit.data.manifest import ManifestError, read_manifest
from voldit.data.nifti import (
    VolumeError,
    as_labels,
    check_same_grid,
    decode_volume,
    label_values,
    mask_labels,
    read_volume,
    relayout,
    write_volume,
)
from voldit.data.preprocess import prepare
from voldit.data.rows import read_row


def test_real_ct_decodes_with_geometry(examples):
    image_path, mask_path = examples["example_ct_sm"]
    image, mask = read_volume(image_path), read_volume(mask_path)
    assert image.array.shape == (122, 101, 30) and image.spacing == (3.0, 3.0, 3.0)
    assert image.array.min() < -1000 < 1000 < image.array.max()  # real HU, beyond the window
    assert set(np.unique(mask.array)) >= {0, 1, 2, 5}  # organ labels
    check_same_grid(image, mask, "example")
    assert np.array_equal(
        decode_volume(image_path.read_bytes()).array, image.array
    )  # gzip bytes, as Ray reads


def test_eval_preprocessing_windows_and_centre_crops_real_ct(examples):
    image, mask = (read_volume(p) for p in examples["example_ct"])
    out = prepare(image, {"mask": mask}, roi_size=(64, 64, 32))
    assert out["image"].shape == out["mask"].shape == (1, 64, 64, 32)
    assert out["image"].min() == -1 and out["image"].max() == 1
    labels = set(out["mask"].unique().tolist())
    assert (
        labels <= set(np.unique(mask.array).tolist()) and len(labels) > 3
    )  # nearest neighbour: no new values
    # The crop's affine places voxel (0, 0, 0) of the crop at the centre-crop offset of the original.
    offset = [(s - r) // 2 for s, r in zip(image.array.shape, (64, 64, 32), strict=True)]
    np.testing.assert_allclose(out["affine"][:3, 3], image.affine[:3, :3] @ offset + image.affine[:3, 3])
    x, y, z = offset
    expected = np.clip(image.array[x : x + 64, y : y + 64, z : z + 32], -1000, 1000) / 1000.0
    np.testing.assert_allclose(out["image"][0].numpy(), expected, atol=1e-6)


def test_small_volumes_are_padded_with_air_and_background(examples):
    image, mask = (read_volume(p) for p in examples["example_ct_sm"])
    out = prepare(image, {"mask": mask}, roi_size=(128, 128, 40))
    assert out["image"].shape == (1, 128, 128, 40)
    assert out["image"][0, :, :, 0].eq(-1).all() and out["mask"][0, :, :, 0].eq(0).all()


def test_training_augmentation_is_seeded_and_keeps_image_and_mask_aligned(examples):
    image, mask = (read_volume(p) for p in examples["example_ct_sm"])
    a = prepare(image, {"mask": mask}, (64, 64, 16), train=True, seed=5)
    b = prepare(image, {"mask": mask}, (64, 64, 16), train=True, seed=5)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    crops = {
        prepare(image, {"mask": mask}, (64, 64, 16), train=True, seed=s)["affine"][:3, 3].tobytes()
        for s in range(6)
    }
    assert len(crops) > 1  # random crops differ between seeds
    labelled = a["mask"] > 0  # organs are soft tissue, not air: the mask moved with the image
    assert a["image"][labelled].mean() > -0.3


def _nifti_bytes(array, affine=None):
    return nib.Nifti1Image(array, np.eye(4) if affine is None else affine).to_bytes()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not a nifti file at all", "not a readable NIfTI"),
        (
            gzip.compress(_nifti_bytes(np.arange(4096, dtype=np.int16).reshape(16, 16, 16)))[:2000],
            "not a readable",
        ),
        (_nifti_bytes(np.arange(4096, dtype=np.int16).reshape(16, 16, 16))[:3000], "not a readable NIfTI"),
        (_nifti_bytes(np.zeros((8, 8), np.float32)), "expected a 3D volume"),
        (_nifti_bytes(np.zeros((8, 8, 8, 2), np.float32)), "expected a 3D volume"),
        (_nifti_bytes(np.full((4, 4, 4), np.nan, np.float32)), "NaN"),
    ],
    ids=["garbage", "truncated-gz", "truncated", "2d", "4d", "nan"],
)
def test_bad_volumes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(VolumeError, match=reason):
        decode_volume(data, "row-7")


def test_singleton_fourth_axis_and_grid_mismatch():
    assert decode_volume(_nifti_bytes(np.zeros((4, 5, 6, 1), np.float32))).array.shape == (4, 5, 6)
    a = decode_volume(_nifti_bytes(np.zeros((4, 4, 4), np.float32)))
    with pytest.raises(VolumeError, match="mask shape"):
        check_same_grid(a, decode_volume(_nifti_bytes(np.zeros((4, 4, 5), np.float32))), "r")
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    with pytest.raises(VolumeError, match="mask affine differs"):
        check_same_grid(a, decode_volume(_nifti_bytes(np.zeros((4, 4, 4), np.float32), shifted)), "r")


def test_a_row_is_read_with_its_masks_on_the_image_grid(tmp_path):
    """The one row reader of training and encoding, and the one label-map check of encoding and synthesis."""
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = write_volume(tmp_path / "ct.nii.gz", np.zeros((4, 4, 4), np.int16), affine)
    labels = write_volume(tmp_path / "m.nii.gz", np.full((4, 4, 4), 2, np.uint8), affine)
    other = write_volume(tmp_path / "other.nii.gz", np.zeros((4, 4, 5), np.uint8), affine)
    fraction = write_volume(tmp_path / "f.nii.gz", np.full((4, 4, 4), 0.5, np.float32), affine)
    ct, masks = read_row({"id": "r", "image": image, "mask": labels}, ["mask"])
    assert ct.array.dtype == masks["mask"].array.dtype == np.float32
    assert mask_labels(masks["mask"], "mask m.nii.gz").dtype == np.int32
    with pytest.raises(VolumeError, match="^r: other: mask shape"):
        read_row({"id": "r", "image": image, "mask": labels, "other": other}, ["mask", "other"])
    with pytest.raises(VolumeError, match=r"^mask f\.nii\.gz: not a label map \(non-integer values\)$"):
        mask_labels(
            read_row({"id": "r", "image": image, "mask": fraction}, ["mask"])[1]["mask"], "mask f.nii.gz"
        )


def test_write_is_atomic_and_round_trips(tmp_path):
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    path = write_volume(tmp_path / "out.nii.gz", np.arange(60, dtype=np.int16).reshape(3, 4, 5), affine)
    back = read_volume(path)
    assert np.array_equal(back.array, np.arange(60).reshape(3, 4, 5)) and np.allclose(back.affine, affine)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    with pytest.raises(VolumeError, match="cannot be read"):
        read_volume(tmp_path / "missing.nii.gz")


def test_gzip_volumes_are_standard_and_reproducible(tmp_path):
    """Written through ISA-L, a .nii.gz is plain gzip that nibabel and Python's gzip read back, with no
    timestamp: the same volume gives the same bytes."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3000, (40, 30, 20), dtype=np.int16)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    first = write_volume(tmp_path / "a.nii.gz", hu, affine)
    again = write_volume(tmp_path / "b.nii.gz", hu, affine)
    assert first.read_bytes() == again.read_bytes()
    image = nib.load(first)
    assert np.array_equal(np.asarray(image.dataobj), hu) and np.allclose(image.affine, affine)
    assert image.header.get_xyzt_units()[0] == "mm"
    plain = write_volume(tmp_path / "a.nii", hu, affine)
    assert gzip.decompress(first.read_bytes()) == plain.read_bytes()


def test_label_maps_are_recognised_in_any_stored_type():
    labels = np.zeros((20, 10, 6), np.uint8, order="F")
    labels[2:5, 1:3, :] = 7
    labels[9, 9, 5] = 2
    assert as_labels(labels) is labels
    assert label_values(labels).tolist() == [0, 2, 7]
    assert label_values(as_labels(labels.astype(np.float32))).tolist() == [0, 2, 7]
    assert as_labels(labels + np.float32(0.5)) is None  # not a label map
    assert as_labels(np.full((2, 2, 2), 3e9, np.float64)) is None  # beyond int32
    signed = labels.astype(np.int16) - 3
    assert label_values(signed).tolist() == [-3, -1, 4]  # negative values: sorted, not counted
    assert label_values(np.array([[[0, 70000]]], np.int32)).tolist() == [0, 70000]


def test_manifest_validation_reports_rows(tmp_path, examples):
    image, mask = examples["example_ct_sm"]
    good = tmp_path / "good.csv"
    good.write_text(f"image,mask\n{image},{mask}\n{examples['example_ct'][0]},{examples['example_ct'][1]}\n")
    frame = read_manifest(good, ["image", "mask"])
    assert frame["id"].tolist() == ["example_ct_sm", "example_ct"]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,mask\n{image},{mask}\n{image},{mask}\n/nope/ct.nii.gz,{mask}\n{image},\n")
    with pytest.raises(ManifestError) as error:
        read_manifest(bad, ["image", "mask"])
    message = str(error.value)
    assert message.startswith(f"{bad}: 3 problem(s)")
    assert "row 2: duplicates an earlier row" in message
    assert "row 3: image /nope/ct.nii.gz does not exist" in message
    assert "row 4: empty mask" in message
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['mask'\]"):
        read_manifest(_only_image(tmp_path, image), ["image", "mask"])


def _only_image(tmp_path, image):
    path = tmp_path / "img.csv"
    path.write_text(f"image\n{image}\n")
    return path


def test_volumes_and_manifests_read_through_fsspec_urls(examples, tmp_path):
    # Object storage goes through fsspec; its in-memory filesystem exercises the same URL path as s3://.
    import fsspec

    image, mask = examples["example_ct_sm"]
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/ct.nii.gz", image.read_bytes())
    fs.pipe("/bucket/seg.nii.gz", mask.read_bytes())
    remote = read_volume("memory://bucket/ct.nii.gz")
    assert np.array_equal(remote.array, read_volume(image).array)
    csv = tmp_path / "m.csv"
    csv.write_text(
        "image,mask\nmemory://bucket/ct.nii.gz,memory://bucket/seg.nii.gz\nmemory://bucket/no.nii.gz,x\n"
    )
    with pytest.raises(ManifestError) as error:
        read_manifest(csv, ["image", "mask"])
    assert "row 2: image memory://bucket/no.nii.gz does not exist" in str(error.value)
    assert "row 1" not in str(error.value)
    with pytest.raises(VolumeError, match="cannot be read"):
        read_volume("memory://bucket/missing.nii.gz")


def test_volumes_are_read_in_c_order_and_written_in_niftis_order(tmp_path):
    """Reading gives C-ordered arrays (what torch and MONAI run fast on), writing accepts any layout,
    and neither changes a voxel: the blocked copy covers volumes whose sides are not block multiples."""
    rng = np.random.default_rng(1)
    volume = rng.integers(-1000, 2000, (70, 33, 45), dtype=np.int16)
    flipped = volume[:, ::-1, :]  # neither C- nor Fortran-contiguous
    for layout, want in ((volume, volume), (np.asfortranarray(volume), volume), (flipped, flipped)):
        back = read_volume(write_volume(tmp_path / "v.nii.gz", layout, np.eye(4)), dtype=None)
        assert back.array.flags.c_contiguous and np.array_equal(back.array, want)
    fortran = relayout(volume, "F")
    assert fortran.flags.f_contiguous and np.array_equal(fortran, volume)
    assert relayout(fortran, "F") is fortran and relayout(volume, "C") is volume
