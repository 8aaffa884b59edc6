"""Sampling and synthesis: unconditional `voldit sample`, the `voldit synthesize` Ray job over mask CSVs."""

import dataclasses
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import CONFIGS, ROOT, kill_when, write_csv
from voldit.builders import build_vqgan
from voldit.config import load_config
from voldit.data.nifti import Volume, write_volume
from voldit.data.preprocess import prepare_condition
from voldit.models.decoding import decode_tiled
from voldit.sampling import Pipeline, SamplingSettings
from voldit.synthesis import SynthesisError, plan_rows, safe_name, write_record
from voldit.synthesis_plan import Request, plan

FAST = SamplingSettings(sampler="ddim", steps=4)


def _synthesize(csv, run, out, **kwargs):
    from voldit.distributed.synthesize import synthesize

    kwargs.setdefault("settings", FAST)
    return synthesize(csv, run["tgca"], out, batch_size=2, progress=False, **kwargs)


def _command(csv, run, out, *extra):
    """`voldit synthesize` as a separate process, the way users run it."""
    command = [
        sys.executable,
        "-m",
        "voldit",
        "synthesize",
        "--csv",
        csv,
        "--tgca",
        run["tgca"],
        "--output",
        out,
    ]
    return [*map(str, command), *extra]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "row_id",
    ["../../x", "/etc/passwd", "a/b\\c", "..", ".hidden", "a b?*", "ok_name-1.2"],
)
def test_row_ids_become_names_that_stay_in_the_folder(row_id):
    name = safe_name(row_id)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".")
    assert name not in ("..", ".")
    if row_id == "ok_name-1.2":
        assert name == row_id  # a harmless id is kept as it is
    else:
        assert name != safe_name(row_id + "?")  # a changed id carries a hash: no accidental clashes


def test_tiled_decode_equals_the_whole_decode():
    cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml")
    torch.manual_seed(0)
    vq = build_vqgan(cfg).eval()
    z = torch.randn(1, 8, 12, 10, 7)  # tiles of 4 do not divide these sizes
    with torch.no_grad():
        whole = vq.decode_stage_2_outputs(z)
        tiled = decode_tiled(vq, z, factor=8, tile=4, halo=8)
        thin = decode_tiled(vq, z, factor=8, tile=4, halo=1)
    assert tiled.shape == whole.shape == (1, 1, 96, 80, 56)
    # With a halo beyond the decoder's receptive field, tiles are exact (float summation order only).
    assert (tiled - whole).abs().max() < 1e-5
    assert (thin - whole).abs().max() > 1e-3  # the halo is what makes it exact


def test_masks_are_prepared_as_in_training_and_outputs_return_to_their_grid():
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 30]
    labels = np.zeros((50, 80, 20), np.float32)
    labels[10:40, 20:60, 5:15] = 3
    prepared = prepare_condition({"mask": Volume(labels, affine)}, [64, 64, 32])
    assert prepared.condition.shape == (1, 64, 64, 32)
    assert prepared.condition.sum() == labels[:, 8:72].sum()  # centre crop along y, pad elsewhere
    np.testing.assert_array_equal(prepared.source_affine, affine)
    restored = prepared.restore(torch.zeros(64, 64, 32))  # a generated volume of soft tissue (0)
    assert restored.shape == labels.shape
    assert (restored[:, 8:72] == 0).all()
    assert (restored[:, :8] == -1).all() and (restored[:, 72:] == -1).all()  # outside the view: air


def test_rows_get_stable_seeds_and_problems_before_work(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("id,mask,seed\na,m1.nii.gz,7\nb,m2.nii.gz,\n../a,m3.nii.gz,x\nc/,m4.nii.gz,\n")
    frame = plan_rows(csv, ["mask"], base_seed=3)
    assert frame["seed"][0] == 7
    assert frame["seed"][1] == plan_rows(csv, ["mask"], base_seed=3)["seed"][1]  # stable
    assert frame["seed"][1] != plan_rows(csv, ["mask"], base_seed=4)["seed"][1]
    assert "not an integer" in frame["problem"][2]
    assert frame["problem"][3] == ""
    csv.write_text("id,mask\na,m1.nii.gz\na,m2.nii.gz\n")
    with pytest.raises(SynthesisError, match="duplicates"):
        plan_rows(csv, ["mask"])


def test_a_resumed_run_is_planned_without_ray(tmp_path):
    """The plan alone: rows finished before are skipped, rows with a problem are recorded as failed
    without any work, rows an actor finds finished count as skipped, and other settings are refused."""
    csv = tmp_path / "m.csv"
    csv.write_text("id,mask,seed\na,m1.nii.gz,1\nb,m2.nii.gz,2\nc,m3.nii.gz,x\n")
    info = {"checkpoint_id": "1" * 12, "vqgan_id": "2" * 12, **FAST.recorded(), "field_of_view": "label"}
    request = Request(csv, tmp_path / "out", plan_rows(csv, ["mask"]), ["mask"], FAST, None, info, {})
    first = plan(request)
    assert (first.todo["id"].tolist(), first.skipped) == (["a", "b"], 0)
    assert first.journal.records["c"]["error"] == "seed 'x' is not an integer"
    # Row a finished as an actor leaves it: its volume, then its ok record.
    write_volume(first.layout.volume("a"), np.zeros((2, 2, 2), np.int16), np.eye(4))
    write_record(first.layout, {"id": "a", "name": "a", "seed": 1, "status": "ok", "shape": [2, 2, 2]})
    again = plan(request)
    assert (again.todo["id"].tolist(), again.skipped) == (["b"], 1)
    again.finished({"id": "b", "name": "b", "seed": 2, "status": "ok", "shape": [2, 2, 2]}, found=True)
    summary = again.summary(None)
    assert (summary.total, summary.skipped, summary.synthesized) == (3, 2, 0)
    assert [(r["id"], r["status"]) for r in summary.failed] == [("c", "failed")]
    with pytest.raises(SynthesisError, match="steps: 4 before, 5 now"):
        plan(dataclasses.replace(request, run_info={**info, "steps": 5}))


def test_a_seed_gives_the_same_volume_in_any_batch(tiny_tgca_run, crops):
    pipeline = Pipeline(tiny_tgca_run["tgca"], settings=FAST, device="cpu")
    assert pipeline.vqgan_checkpoint.path == tiny_tgca_run["vqgan"]  # recorded at training, not passed
    masks = [prepare_condition({"mask": _volume(crops["rows"][k][1])}, [64, 64, 32]) for k in (0, 1)]
    condition = torch.stack([m.condition for m in masks])
    both = pipeline.sample_latents([11, 12], condition)
    alone = pipeline.sample_latents([12], condition[1:])
    torch.testing.assert_close(both[1:], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_a_volume_that_cannot_be_written_fails_alone(tiny_tgca_run, crops, tmp_path, monkeypatch):
    """Volumes are written by a thread pool: one failing write marks that row failed, not its batch."""
    import json

    import voldit.synthesis as synthesis

    real = synthesis.write_volume

    def flaky(path, *args):
        if "second" in str(path):
            raise OSError("No space left on device")
        return real(path, *args)

    monkeypatch.setattr(synthesis, "write_volume", flaky)
    synth = synthesis.Synthesizer(tiny_tgca_run["tgca"], tmp_path, settings={"sampler": "ddim", "steps": 2})
    names = ["first", "second", "third"]
    masks = [str(crops["rows"][k][1]) for k in range(3)]
    result = synth(
        {"id": np.array(names), "name": np.array(names), "seed": np.arange(3), "mask": np.array(masks)}
    )
    assert result["error"][0] == result["error"][2] == ""
    assert "OSError: No space left on device" in result["error"][1]
    records = {n: json.loads((tmp_path / "records" / f"{n}.json").read_text()) for n in names}
    assert [records[n]["status"] for n in names] == ["ok", "failed", "ok"]
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == ["first.nii.gz", "third.nii.gz"]

    # A decode that fails (say, out of memory) part-way: the volumes decoded before it are still written.
    monkeypatch.setattr(synthesis, "write_volume", real)
    other = synthesis.Synthesizer(
        tiny_tgca_run["tgca"], tmp_path / "b", settings={"sampler": "ddim", "steps": 2}
    )
    decode, calls = other.pipeline.decode, []

    def failing_decode(latents):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return decode(latents)

    monkeypatch.setattr(other.pipeline, "decode", failing_decode)
    result = other(
        {"id": np.array(names), "name": np.array(names), "seed": np.arange(3), "mask": np.array(masks)}
    )
    assert result["error"][0] == ""
    assert all("RuntimeError: CUDA out of memory" in e for e in result["error"][1:])
    assert [p.name for p in (tmp_path / "b" / "volumes").iterdir()] == ["first.nii.gz"]


def _volume(path):
    from voldit.data.nifti import read_volume

    return read_volume(path)


def test_synthesize_example_masks(tiny_tgca_run, crops, examples, tmp_path, ray_session):
    rows = [(f"crop{k}", crops["rows"][k][1]) for k in (0, 5, 11)]
    rows.append(("whole_ct", examples["example_ct"][1]))  # 122x101x112: cropped to the model's view
    csv = write_csv(tmp_path / "masks.csv", rows, header="id,mask")
    out = tmp_path / "out"
    # The whole CT has a few organs the ten training crops never showed: allowed here on purpose.
    refused = _synthesize(csv, tiny_tgca_run, tmp_path / "strict")
    assert [r["id"] for r in refused.failed] == ["whole_ct"]
    assert "never in the training masks" in refused.failed[0]["error"]
    summary = _synthesize(csv, tiny_tgca_run, out, allow_unseen_labels=True)
    assert (summary.total, summary.synthesized, summary.failed) == (4, 4, [])
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest["id"]) == [r[0] for r in rows]
    assert set(manifest["status"]) == {"ok"} and (manifest["error"] == "").all()
    assert {"seed", "sampler", "steps", "guidance", "checkpoint_id", "vqgan_id", "seconds"} <= set(manifest)
    assert (manifest["sampler"] == "ddim").all() and (manifest["steps"] == 4).all()
    for (_row_id, mask_path), line in zip(rows, manifest.to_dict("records"), strict=True):
        mask, volume = nib.load(mask_path), nib.load(line["output"])
        assert volume.shape == mask.shape  # the mask's own geometry
        np.testing.assert_allclose(volume.affine, mask.affine, atol=1e-5)
        data = np.asarray(volume.dataobj)
        assert data.dtype == np.int16 and data.min() >= -1000 and data.max() <= 1000
        assert os.path.isfile(line["preview"])
    assert (out / "contact_sheet.png").is_file()

    # Re-running does nothing; the same rows and seeds elsewhere give the same volumes.
    first = {p: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()}
    again = _synthesize(csv, tiny_tgca_run, out, allow_unseen_labels=True)
    assert (again.skipped, again.synthesized) == (4, 0)
    assert {p: p.stat().st_mtime_ns for p in (out / "volumes").iterdir()} == first
    twin = _synthesize(csv, tiny_tgca_run, tmp_path / "twin", allow_unseen_labels=True)
    assert twin.synthesized == 4
    for path in first:
        a = np.asarray(nib.load(path).dataobj)
        b = np.asarray(nib.load(tmp_path / "twin" / "volumes" / path.name).dataobj)
        np.testing.assert_array_equal(a, b)

    with pytest.raises(SynthesisError, match="other checkpoints or settings"):
        _synthesize(csv, tiny_tgca_run, out, settings=SamplingSettings(sampler="ddim", steps=5))


def test_bad_rows_are_recorded_and_the_rest_complete(tiny_tgca_run, crops, examples, tmp_path):
    good = crops["rows"][3][1]
    bad = tmp_path / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 32), np.uint8), np.eye(4)), bad / "empty.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.uint8), np.eye(4)), bad / "4d.nii.gz")
    (bad / "corrupt.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(500))
    image = nib.load(good)
    labels = np.asarray(image.dataobj, dtype=np.float32)  # the same labels, stored as floats: usable
    nib.save(nib.Nifti1Image(labels, image.affine), bad / "float.nii.gz")
    nib.save(nib.Nifti1Image(labels + 0.5 * (labels > 0), image.affine), bad / "fraction.nii.gz")
    rows = [
        ("good", good),
        ("float", bad / "float.nii.gz"),
        ("fraction", bad / "fraction.nii.gz"),
        ("missing", bad / "nope.nii.gz"),
        ("corrupt", bad / "corrupt.nii.gz"),
        ("empty", bad / "empty.nii.gz"),
        ("fourd", bad / "4d.nii.gz"),
        ("unseen", examples["example_ct_sm"][1]),  # the other CT's labels include ones never trained on
        ("../../escape", good),
        ("sub/dir/name", good),
    ]
    csv = write_csv(tmp_path / "masks.csv", rows, header="id,mask")
    out = tmp_path / "work" / "out"
    before = set(_files(tmp_path))
    result = subprocess.run(
        _command(csv, tiny_tgca_run, out, "--sampler", "ddim", "--steps", "3"),
        cwd=ROOT,
        env={**os.environ, "RAY_ADDRESS": "local"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    assert "6 row(s) failed" in result.stderr
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("id")
    status = manifest["status"].to_dict()
    assert status == {
        "good": "ok",
        "float": "ok",
        "fraction": "failed",
        "missing": "failed",
        "corrupt": "failed",
        "empty": "failed",
        "fourd": "failed",
        "unseen": "failed",
        "../../escape": "ok",
        "sub/dir/name": "ok",
    }
    errors = manifest["error"].to_dict()
    assert "cannot be read" in errors["missing"]
    assert "not a readable NIfTI" in errors["corrupt"]
    assert "empty" in errors["empty"]
    assert "not a label map" in errors["fraction"]
    assert "expected a 3D volume" in errors["fourd"]
    assert "never in the training masks" in errors["unseen"]
    # Nothing was written outside the output folder; the traversal id landed inside it.
    new = set(_files(tmp_path)) - before
    assert all(path.startswith("work/out/") for path in new), sorted(new)
    escaped = manifest.loc["../../escape", "output"]
    assert os.path.realpath(escaped).startswith(os.path.realpath(out) + os.sep)


def test_sample_command_single_checkpoint_and_epoch_range(tiny_tgca_run, tmp_path):
    from voldit.cli import main

    out = tmp_path / "samples"
    args = ["--sampler", "ddim", "--steps", "3", "--seed", "5"]
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(tiny_tgca_run["dit"]),
                "--output",
                str(out),
                "--n-samples",
                "3",
                *args,
            ]
        )
        == 0
    )
    volumes = sorted(out.glob("sample_*.nii.gz"))
    assert [p.name for p in volumes] == ["sample_000.nii.gz", "sample_001.nii.gz", "sample_002.nii.gz"]
    data = [np.asarray(nib.load(p).dataobj) for p in volumes]
    assert all(d.shape == (64, 64, 32) and d.dtype == np.int16 for d in data)
    assert len(list((out / "previews").glob("*.png"))) == 3

    epochs = tmp_path / "epochs"
    run = ["--run", str(tiny_tgca_run["dit_run"]), "--output", str(epochs), "--n-samples", "1", *args]
    assert main(["sample", *run, "--epoch-start", "1", "--epoch-end", "2"]) == 0
    assert sorted(p.name for p in epochs.iterdir()) == ["epoch_0001", "epoch_0002"]
    assert main(["sample", *run, "--epoch-start", "1", "--epoch-end", "9", "--epoch-step", "4"]) == 2


@pytest.mark.slow
def test_killed_synthesis_resumes_with_every_row_written_once(tiny_tgca_run, crops, tmp_path):
    rows = [(f"row{k:02d}", crops["rows"][k % 12][1]) for k in range(10)]
    csv = write_csv(tmp_path / "masks.csv", rows, header="id,mask")
    out = tmp_path / "out"
    command = _command(csv, tiny_tgca_run, out, "--batch-size", "1", "--steps", "150")
    env = {**os.environ, "RAY_ADDRESS": "local"}
    records = out / "records"
    kill_when(command, lambda: bool(list(records.glob("*.json"))), env)
    done = {p.stem: p.stat().st_mtime_ns for p in (out / "volumes").glob("*.nii.gz")}
    assert 0 < len(done) < 10, "the run should have been killed part-way"

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert f"{len(done)} already done" in result.stdout
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest["id"]) == [r[0] for r in rows] and set(manifest["status"]) == {"ok"}
    names = sorted(p.name for p in (out / "volumes").iterdir())
    assert names == [f"row{k:02d}.nii.gz" for k in range(10)]  # every row once, no temporaries
    assert not [p for p in out.rglob(".*")]
    for stem, mtime in done.items():  # the first run's volumes were kept, not redone
        assert (out / "volumes" / f"{stem}.nii").with_suffix(".gz").stat().st_mtime_ns == mtime
    shutil.rmtree(out)


def test_a_mask_of_another_label_set_and_grid_is_mapped_and_comes_back_on_its_grid(
    tiny_tgca_run, examples, tmp_path
):
    """The whole example CT's mask stored in LPS at 3x3x6 mm (larger than the field of view, with organs
    the training crops never showed): refused with the fix named, then synthesised through a label map."""
    import json

    from voldit.checkpoint import load_checkpoint
    from voldit.data.examples import _stored_as

    source = nib.load(examples["example_ct"][1])
    lps, affine = _stored_as(np.asarray(source.dataobj).astype(np.uint8), source.affine, "LPS")
    thick, affine = _stored_as(lps, affine, "thick")
    mask_path = tmp_path / "lps_thick.nii.gz"
    nib.save(nib.Nifti1Image(thick, affine), mask_path)
    trained = load_checkpoint(tiny_tgca_run["tgca"]).meta["condition_labels"]["mask"]
    unseen = sorted(set(np.unique(thick).tolist()) - set(trained))
    assert unseen  # the premise: organs the crops never showed
    label_map = tmp_path / "map.csv"
    label_map.write_text("from,to\n" + "".join(f"{v},drop\n" for v in unseen))
    csv = write_csv(tmp_path / "masks.csv", [("lps", mask_path)], header="id,mask")

    refused = _synthesize(csv, tiny_tgca_run, tmp_path / "strict")
    assert (
        "--label-map" in refused.failed[0]["error"] and "--allow-unseen-labels" in refused.failed[0]["error"]
    )
    out = tmp_path / "out"
    summary = _synthesize(csv, tiny_tgca_run, out, label_map=label_map)
    assert (summary.synthesized, summary.failed) == (1, [])
    volume = nib.load(out / "volumes" / "lps.nii.gz")
    assert volume.shape == thick.shape and nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    record = json.loads((out / "records" / "lps.json").read_text())
    view = record["field_of_view"]
    assert 0 < view["cut"] < 1 and "outside the model's field of view" in record["warning"]
    assert view["voxels"][:2] == [[0, 122], [0, 101]]  # the whole axial extent fits in 384 mm
    assert view["mm"][2][1] - view["mm"][2][0] == pytest.approx(32 * 6.0, abs=0.01)
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert manifest.loc[0, "status"] == "ok" and "field of view" in manifest.loc[0, "warning"]
    data = np.asarray(volume.dataobj)
    z0, z1 = view["voxels"][2]
    assert (data[:, :, :z0] == -1000).all() and (data[:, :, z1:] == -1000).all()  # air out of view
    assert (data[:, :, z0:z1] > -1000).any()
    run = json.loads((out / "run.json").read_text())
    assert run["field_of_view"] == "label" and run["label_map"] == {str(v): 0 for v in unseen}
