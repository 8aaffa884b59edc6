"""Real-world CT and masks: the model's grid (spacing, orientation), synthesis back onto any mask's own
grid with the field of view placed on the labels, label sets counted over whole masks, label maps."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS
from voldit.config import ConfigError, load_config
from voldit.data.examples import _stored_as
from voldit.data.intensity import unit_to_hu
from voldit.data.labels import LabelMapError, apply_label_map, read_label_map
from voldit.data.nifti import Volume, label_values, read_volume
from voldit.data.preprocess import Grid, prepare, prepare_condition

GRID = Grid((64, 64, 32), (6.0, 6.0, 6.0), "RAS")  # the tiny configs' grid


@pytest.fixture(scope="module")
def section(examples):
    """A real 122x101x64 section of the example CT (3 mm, RAS) with its organ labels."""
    image, mask = (read_volume(p, dtype=None) for p in examples["example_ct"])
    affine = image.affine.copy()
    affine[:3, 3] += image.affine[:3, :3] @ [0, 0, 24]
    return Volume(image.array[:, :, 24:88].astype(np.float32), affine), mask.array[:, :, 24:88].astype(
        np.int32
    )


@pytest.mark.parametrize("stored", ["RAS", "LPS", "thick"])
def test_a_volume_on_the_model_grid_goes_back_onto_any_masks_own_grid(section, stored):
    """A perfect model's output (the real CT on the model's grid) restored onto the section's mask, stored
    in RAS, in LPS or at 3x3x6 mm: the mask's exact grid, and the same anatomy as the CT stored that way."""
    image, labels = section
    real = prepare(image, None, GRID)  # the CT on the model's grid: what a perfect model would generate
    mask_array, mask_affine = _stored_as(labels, image.affine, stored)
    ct_array, _ = _stored_as(image.array, image.affine, stored)
    prepared = prepare_condition({"mask": Volume(mask_array, mask_affine)}, GRID, "centre")
    # The same field of view in the world, however the mask is stored.
    np.testing.assert_allclose(prepared.affine, real["affine"], atol=0.5 if stored == "thick" else 1e-4)
    restored = prepared.restore(real["image"][0])
    assert tuple(restored.shape) == mask_array.shape
    hu = unit_to_hu(restored).numpy()
    view = prepared.field_of_view["voxels"]
    inside = tuple(slice(a, b) for a, b in view)
    error = np.abs(hu[inside] - np.clip(ct_array[inside], -1000, 1000)).mean()
    # 3 mm -> 6 mm -> 3 mm blurs edges; a wrongly flipped or shifted volume is off by hundreds of HU.
    flipped = np.abs(hu[inside][::-1, ::-1] - np.clip(ct_array[inside], -1000, 1000)).mean()
    assert error < 60 and flipped > 3 * error, (error, flipped)
    # The whole axial extent is in view (366x303 mm in a 384 mm field), air is all that lies outside it.
    assert view[0] == [0, mask_array.shape[0]] and view[1] == [0, mask_array.shape[1]]
    outside = np.ones(hu.shape, bool)
    outside[inside] = False
    assert not outside.any() or (hu[outside] == -1000).all()


def test_the_field_of_view_is_placed_on_the_labels_and_the_cut_is_reported(examples):
    mask = read_volume(examples["example_ct"][1], dtype=None)  # 122x101x112 at 3 mm: 336 mm, the view 192
    mask.array = mask.array.astype(np.int32)
    top = mask.array.copy()
    top[:, :, :90] = 0  # labels only in the top 22 slices
    centred = prepare_condition({"mask": Volume(top, mask.affine)}, GRID, "centre")
    placed = prepare_condition({"mask": Volume(top, mask.affine)}, GRID, "label")
    assert not centred.condition.any()  # the volume's centre misses them
    assert centred.field_of_view["cut"] == 1.0
    assert placed.condition.any() and placed.field_of_view["cut"] == 0.0
    (z0, z1) = placed.field_of_view["voxels"][2]
    assert z0 <= 90 and z1 == 112  # in view, kept inside the volume
    assert z1 - z0 == pytest.approx(32 * 6 / 3, abs=2)
    # The whole mask is larger than the view: synthesised in part, and how much was cut is said.
    whole = prepare_condition({"mask": mask}, GRID, "label").field_of_view
    labelled = mask.array != 0
    (x0, x1), (y0, y1), (z0, z1) = whole["voxels"]
    kept = labelled[x0:x1, y0:y1, z0:z1].sum() / labelled.sum()
    assert 0.2 < whole["cut"] < 0.8 and whole["cut"] == pytest.approx(1 - kept, abs=1e-3)
    assert whole["labelled_voxels"] == int(labelled.sum())
    (lo, hi) = whole["mm"][2]
    assert hi - lo == pytest.approx(192, abs=0.01)  # 32 voxels of 6 mm


def test_without_a_grid_masks_keep_their_stored_voxels(examples):
    """The seed configs (no spacing, no orientation): masks are only padded and cropped, exactly invertible."""
    mask = read_volume(examples["example_ct"][1], dtype=None)
    mask.array = mask.array.astype(np.int32)
    prepared = prepare_condition({"mask": mask}, [64, 64, 32])
    np.testing.assert_array_equal(prepared.condition[0].numpy(), mask.array[29:93, 18:82, 40:72])
    volume = torch.rand(64, 64, 32) * 2 - 1
    restored = prepared.restore(volume)
    np.testing.assert_array_equal(restored[29:93, 18:82, 40:72].numpy(), volume.numpy())
    assert (restored[:29] == -1).all() and (restored[:, :, 72:] == -1).all()


def test_grid_keys_are_checked_and_old_checkpoints_keep_their_voxel_order(tmp_path):
    for bad, message in (
        ("training.spacing=[1,0,1]", "training.spacing"),
        ("training.orientation=RAR", "orientation"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIGS / "tiny" / "vqgan.yaml", overrides=[bad])
    assert Grid.of(load_config(CONFIGS / "tiny" / "vqgan.yaml")) == GRID
    seed = Grid.of(load_config(CONFIGS / "stage1" / "vqgan_ds8.yaml"))
    assert (seed.spacing, seed.orientation) == (None, None)  # the authors' recipe: no resampling
    assert Grid.of(load_config(CONFIGS / "tiny" / "dit.yaml")).orientation == "RAS"  # the schema's default

    from voldit.builders import build_vqgan
    from voldit.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml")
    path = save_checkpoint(tmp_path / "vq", config=cfg, stage="vqgan", model=build_vqgan(cfg).state_dict())
    assert Grid.of(load_checkpoint(path).config) == GRID
    stored = (path / "config.yaml").read_text()
    old = stored.replace("  orientation: RAS\n", "").replace("  spacing:\n  - 6.0\n  - 6.0\n  - 6.0\n", "")
    assert "orientation" not in old and "spacing" not in old
    (path / "config.yaml").write_text(old)
    assert Grid.of(load_checkpoint(path).config) == Grid((64, 64, 32))  # saved before grids: as stored


def test_an_unconditional_sample_gets_the_grids_affine():
    affine = Grid((64, 64, 32), (6.0, 6.0, 6.0), "LPS").affine()
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), [6, 6, 6])
    centre = affine @ [31.5, 31.5, 15.5, 1]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_labels_are_counted_over_whole_masks_at_encode(examples, tiny_vqgan_checkpoint, tmp_path):
    """The crop the model sees holds fewer organs than the CT's mask; every one of them can be synthesised."""
    from voldit.data.latents import load_info, summarise
    from voldit.encode import Encoder

    image, mask = examples["example_ct"]
    whole = label_values(np.asarray(nib.load(mask).dataobj).astype(np.int32)).tolist()
    encoder = Encoder(tiny_vqgan_checkpoint, tmp_path / "latents", ["mask"])
    status = encoder({"id": np.array(["ct"]), "image": np.array([str(image)]), "mask": np.array([str(mask)])})
    assert status["error"] == [""]
    info = summarise(tmp_path / "latents", GRID, ["mask"], str(tiny_vqgan_checkpoint))
    assert info.labels["mask"] == whole
    import pyarrow.parquet as pq

    stored = (
        pq.read_table(next((tmp_path / "latents").glob("part-*.parquet")))["mask"]
        .combine_chunks()
        .to_numpy_ndarray()
    )
    assert len(label_values(stored[0].astype(np.int32))) < len(whole)  # the crop alone would lose labels
    recorded = json.loads((tmp_path / "latents" / "dataset.json").read_text())
    assert (recorded["spacing"], recorded["orientation"]) == ([6.0, 6.0, 6.0], "RAS")
    assert load_info(tmp_path / "latents").spacing == [6.0, 6.0, 6.0]


def test_label_maps_from_json_and_csv(tmp_path):
    (tmp_path / "map.json").write_text('{"5": 1, "7": "drop", "-3": 2}')
    (tmp_path / "map.csv").write_text("from,to\n5,1\n7,drop\n-3,2\n")
    (tmp_path / "plain.csv").write_text("5,1\n7,DROP\n-3,2\n")
    expected = {5: 1, 7: 0, -3: 2}
    for name in ("map.json", "map.csv", "plain.csv"):
        assert read_label_map(tmp_path / name) == expected
    labels = np.array([[0, 5, 7], [9, 5, 0]], np.int16)
    np.testing.assert_array_equal(apply_label_map(labels, expected), [[0, 1, 0], [9, 1, 0]])
    np.testing.assert_array_equal(apply_label_map(labels - 3, expected), [[2, 2, 4], [6, 2, 2]])
    for text, message in (
        ('{"5": "liver"}', "not an integer label value or"),
        ("[1, 2]", "expected an object"),
        ("5;1\n", "two columns"),
        ("1.5,2\n", "not an integer label value"),
        ("from,to\n", "maps no value"),
    ):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(LabelMapError, match=message):
            read_label_map(tmp_path / "bad.txt")
    with pytest.raises(LabelMapError, match="cannot be read"):
        read_label_map(tmp_path / "missing.json")


def test_a_pipeline_with_rows_that_fail_finishes_with_a_report(examples, tmp_path, ray_session, capsys):
    """`voldit pipeline` on real sections on three grids, with a corrupt mask and a mask of another label
    set among the rows to synthesise: the others are made and evaluated, the report lists the two, exit 1."""
    import os

    import pandas as pd

    from tests.conftest import write_csv
    from voldit.cli import main
    from voldit.data.examples import write_sections

    rows = write_sections(tmp_path / "data", examples, count=4)
    train, val = write_csv(tmp_path / "train.csv", rows[:3]), write_csv(tmp_path / "val.csv", rows[3:])
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + os.urandom(300))
    masks = [
        ("lps", rows[1][1]),
        ("thick", rows[2][1]),
        ("corrupt", corrupt),
        ("other_set", examples["example_ct_sm"][1]),
    ]
    masks_csv = write_csv(tmp_path / "masks.csv", masks, header="id,mask")
    out = tmp_path / "out"
    code = main(
        ["pipeline", "--train", str(train), "--val", str(val), "--masks", str(masks_csv), "--output", str(out),
         "--workers", "0", "--no-qc", "--set", "training.n_epochs=1", "training.eval_freq=1"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1, captured.err[-3000:]
    assert "2 row(s) failed" in captured.err and "Traceback" not in captured.err
    manifest = pd.read_csv(out / "synthetic" / "manifest.csv", keep_default_na=False).set_index("id")
    assert manifest["status"].to_dict() == {
        "lps": "ok",
        "thick": "ok",
        "corrupt": "failed",
        "other_set": "failed",
    }
    for row_id, mask in masks[:2]:  # each volume on its own mask's grid
        volume, source = nib.load(manifest.loc[row_id, "output"]), nib.load(mask)
        assert volume.shape == source.shape
        np.testing.assert_allclose(volume.affine, source.affine, atol=1e-4)
    report = (out / "report" / "report.md").read_text()
    assert "2 generated volumes" in report
    assert "| synthesis | corrupt | " in report and "| synthesis | other_set | " in report
    assert "--label-map" in report  # the fix is named where the failure is listed
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    assert [f["id"] for f in evaluation["failed_rows"]] == ["corrupt", "other_set"]
    # The models carry the grid: the VolDiT and TGCA took it from their latents.
    from voldit.checkpoint import load_checkpoint

    for stage in ("dit", "tgca"):
        assert Grid.of(load_checkpoint(out / "runs" / stage / "checkpoints" / "best").config) == GRID


def test_evaluation_reads_every_volume_in_ras_order(section, tmp_path):
    """A synthetic volume keeps its mask's orientation: the report compares it axis for axis with RAS CTs."""
    from voldit.evaluation import Item, _read

    image, _ = section
    for how in ("RAS", "LPS"):
        array, affine = _stored_as(image.array, image.affine, how)
        nib.save(nib.Nifti1Image(array, affine), tmp_path / f"{how}.nii.gz")
    ras, lps = (_read(Item(how, str(tmp_path / f"{how}.nii.gz"))) for how in ("RAS", "LPS"))
    np.testing.assert_array_equal(ras, lps)
    assert not np.array_equal(nib.load(tmp_path / "LPS.nii.gz").get_fdata(), ras)


def test_a_corrupt_ct_among_the_training_rows_is_skipped_and_training_finishes(crops, tmp_path, ray_session):
    """One unreadable CT in a training CSV (it exists, so the CSV check passes) costs its row, not the run."""
    import math

    from tests.conftest import write_csv
    from voldit.distributed.train import train

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + bytes(300))
    rows = [*crops["rows"][:3], (corrupt, crops["rows"][0][1])]
    csv = write_csv(tmp_path / "train.csv", rows)
    cfg = load_config(
        CONFIGS / "tiny" / "vqgan.yaml", overrides=["training.n_epochs=1", "training.augment=false"]
    )
    result = train(cfg, "vqgan", str(csv), str(csv), name="vq", storage=str(tmp_path / "runs"), workers=0)
    assert result.metrics["epoch"] == 1 and math.isfinite(result.metrics["val_loss"])
    assert result.metrics["val_samples"] == 3  # the three readable rows


def test_two_condition_keys_come_back_through_the_first_keys_operations(section):
    image, labels = section
    organs, lungs = (np.where(labels == v, v, 0).astype(np.int32) for v in (5, 10))
    masks = {"a": Volume(organs, image.affine), "b": Volume(np.where(lungs > 0, 1, organs), image.affine)}
    prepared = prepare_condition(masks, GRID, "label")
    assert prepared.condition.shape == (2, 64, 64, 32)
    assert tuple(prepared.restore(torch.zeros(64, 64, 32)).shape) == labels.shape


def test_samples_lie_in_the_grids_orientation_with_the_references_voxel_sizes():
    from voldit.sampling import _sample_affine

    reference = np.diag([-0.7, -0.7, 2.0, 1.0])  # an LPS CT
    affine = _sample_affine(Grid((64, 64, 32), None, "RAS"), reference)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")  # the voxels are in RAS order, so is the affine
    np.testing.assert_allclose(np.diag(affine)[:3], [0.7, 0.7, 2.0])
    np.testing.assert_array_equal(_sample_affine(Grid((64, 64, 32)), reference), reference)
