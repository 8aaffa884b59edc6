"""S3 storage against a real S3-compatible server on loopback (the session's moto server): bad
endpoints, credentials and buckets fail before any work; cached keys stay in the cache; evaluate reads a
synthesize folder in S3. (Every verb reading and writing S3 end to end, on a cluster: test_cluster_verbs.)"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from tests.conftest import ROOT

BUCKET = "voldit-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory):
    """The session's moto S3 server with this module's bucket; the environment a voldit process needs."""
    env = {
        **os.environ,
        **s3_server["env"],
        "VOLDIT_CACHE": str(tmp_path_factory.mktemp("cache")),
        "RAY_ADDRESS": "local",
    }
    fs = s3_server["fs"]
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return {"env": env, "fs": fs}


def _voldit(env, *args, expect=0, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "voldit", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_bad_s3_settings_fail_before_any_work(s3, tmp_path):
    env = s3["env"]
    csv = tmp_path / "m.csv"
    csv.write_text("image\nx.nii.gz\n")
    args = ["encode", "--csv", csv, "--vqgan", tmp_path / "vq", "--output"]
    missing = _voldit(env, *args, "s3://no-such-bucket/latents", expect=2)
    assert "bucket 'no-such-bucket' does not exist" in missing.stderr
    wrong = _voldit(
        {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}, *args, f"s3://{BUCKET}/x", expect=2
    )
    assert "cannot reach the S3 endpoint" in wrong.stderr
    anonymous = {k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    anonymous.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none")
    )
    nocreds = _voldit(anonymous, *args, f"s3://{BUCKET}/x", expect=2)
    assert "no S3 credentials" in nocreds.stderr
    # A checkpoint read from S3 (every verb's load_checkpoint) says the same, not a botocore traceback.
    sample = _voldit(
        anonymous, "sample", "--checkpoint", f"s3://{BUCKET}/ckpt", "--output", tmp_path / "o", expect=2
    )
    assert "s3://" in sample.stderr and "no S3 credentials" in sample.stderr
    for result in (missing, wrong, nocreds, sample):
        assert env["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


@pytest.fixture
def s3_here(s3, monkeypatch, tmp_path):
    """The moto server's environment in this process, for in-process calls, with a cache of its own."""
    import s3fs

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3["env"][key])
    monkeypatch.setenv("VOLDIT_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3["fs"]
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.deadline(120)
def test_keys_with_dot_dot_never_leave_the_cache(s3_here, tmp_path):
    from voldit import storage

    fs = s3_here
    for folder, bad_key in (
        ("dots", "../../../escaped.txt"),  # from the cached copy up to tmp_path
        ("slashes", f"/{tmp_path}/absolute.txt"),  # "ckpt//tmp/..." would be an absolute path
    ):
        fs.pipe(f"{BUCKET}/{folder}/ckpt/meta.json", b"{}")
        fs.pipe(f"{BUCKET}/{folder}/ckpt/{bad_key}", b"x")
        with pytest.raises(storage.StorageError, match=r"'\.\.' part, which would be written outside"):
            storage.localize_dir(f"s3://{BUCKET}/{folder}/ckpt")
    assert not [p for p in tmp_path.rglob("*") if p.name in ("escaped.txt", "absolute.txt")]


@pytest.mark.deadline(120)
def test_concurrent_downloads_of_one_checkpoint_share_one_complete_copy(s3_here, monkeypatch):
    from voldit import storage

    fs = s3_here
    files = {
        "config.yaml": b"stage: dit\n",
        "model.safetensors": os.urandom(300_000),
        "nested/ema.safetensors": os.urandom(1_000),
        "meta.json": b'{"step": 1}',
    }
    for name, data in files.items():
        fs.pipe(f"{BUCKET}/race/ckpt/{name}", data)
    url = f"s3://{BUCKET}/race/ckpt"

    downloads = []

    class Slow:  # every file takes a while, so the callers overlap for certain
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_file(self, *args, **kwargs):
            downloads.append(args[0])
            time.sleep(0.1)
            return self.inner.get_file(*args, **kwargs)

    real = storage.filesystem
    monkeypatch.setattr(storage, "filesystem", lambda path: (Slow(real(path)[0]), real(path)[1]))
    start, seen, errors = threading.Barrier(3), [], []

    def caller():
        try:
            start.wait(timeout=30)
            local = storage.localize_dir(url)
            # What a caller finds the moment it gets the path: the whole checkpoint, nothing more.
            seen.append(
                {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
            )
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and seen == [files] * 3
    assert len(downloads) == len(files)  # one caller downloaded, the others waited for its copy
    (root,) = (storage.cache_root() / "remote").iterdir()
    (copy,) = [p for p in root.iterdir() if p.is_dir()]  # no half-written folder beside it

    fs.pipe(f"{BUCKET}/race/ckpt/meta.json", b'{"step": 2}')  # a newer checkpoint under the same URL
    newer = storage.localize_dir(url)
    assert (newer / "meta.json").read_bytes() == b'{"step": 2}'
    assert [p for p in root.iterdir() if p.is_dir()] == [newer] and not copy.exists()  # the old copy went


@pytest.mark.deadline(300)
def test_evaluate_reads_a_synthesize_folder_in_s3_like_a_local_one(
    s3_here, crops, tiny_vqgan_checkpoint, tmp_path
):
    import shutil

    from tests.conftest import write_csv
    from voldit import storage
    from voldit.cli import main

    fs = s3_here
    remote, local = f"s3://{BUCKET}/synthetic-eval", tmp_path / "synthetic"
    vqgan = storage.put_dir(tiny_vqgan_checkpoint, f"s3://{BUCKET}/eval-vqgan")
    (local / "volumes").mkdir(parents=True)
    manifests: dict = {local: [], remote: []}
    for k, (image, mask) in enumerate(crops["rows"][:4]):  # the same files in both folders
        name = f"volumes/g{k}.nii.gz"
        shutil.copy(image, local / name)
        fs.put_file(str(image), f"{BUCKET}/synthetic-eval/{name}")
        for folder, rows in manifests.items():
            rows.append(
                {"id": f"g{k}", "mask": str(mask), "output": storage.join(folder, name), "status": "ok"}
            )
    for folder, rows in manifests.items():
        rows.append({"id": "g9", "mask": str(mask), "output": "", "status": "failed"})  # not evaluated
        storage.write_text(storage.join(folder, "manifest.csv"), pd.DataFrame(rows).to_csv(index=False))
        storage.write_text(storage.join(folder, "run.json"), json.dumps({"vqgan": vqgan}))
    real = write_csv(tmp_path / "real.csv", crops["rows"][6:10])

    results = {}
    for folder in (local, remote):
        report = tmp_path / f"report-{len(results)}"
        assert (
            main(["evaluate", "--generated", str(folder), "--real", str(real), "--output", str(report)]) == 0
        )
        results[folder] = json.loads((report / "evaluation.json").read_text())
        assert (report / "generated_previews.png").is_file()
    from_s3, from_disk = results[remote], results[local]
    assert from_s3["generated"] == {"source": remote, "volumes": 4}
    assert from_s3["vqgan_frechet_distance"]["vqgan"] == vqgan  # the folder's run.json names its VQ-GAN
    assert set(from_s3["mask_fidelity"]["tissue_dice"]) == {"g0", "g1", "g2", "g3"}
    from_s3.pop("generated"), from_disk.pop("generated")
    assert from_s3 == from_disk  # every number as for the local copy


@pytest.mark.deadline(120)
def test_a_resumed_synthesis_plans_from_its_journal_in_a_few_objects(s3_here):
    from voldit.synthesis import Journal, Layout

    fs = s3_here
    layout = Layout.of(f"s3://{BUCKET}/journaled")
    journal = Journal.open(layout, [])
    assert journal.records == {} and journal.parts == []
    journal.flush_rows = 1000
    names = [f"row{k:04d}" for k in range(2500)]
    for k, name in enumerate(names):
        journal.add({"name": name, "status": "failed" if k % 10 == 0 else "ok", "seed": k})
    assert len(fs.ls(f"{BUCKET}/journaled/journal")) == 2  # a part per 1,000 records; 500 pending
    journal.add({"name": "row0000", "status": "ok", "seed": 0})  # a failed row done again: the later wins
    journal.flush()
    fs.invalidate_cache()
    assert len(fs.ls(f"{BUCKET}/journaled/journal")) == 3

    again = Journal.open(layout, names)
    assert again.records == journal.records
    assert again.done() == {n for k, n in enumerate(names) if k == 0 or k % 10}
    fs.invalidate_cache()
    parts = fs.ls(f"{BUCKET}/journaled/journal")
    assert len(parts) == 1 and again.parts == [f"s3://{parts[0]}"]  # merged: the next resume reads one
    assert Journal.open(layout, names).records == journal.records


@pytest.mark.deadline(300)
def test_an_actor_does_not_redo_a_row_whose_record_is_in_s3(s3_here, tiny_tgca_run, crops):
    """Rows a killed driver finished after its journal's last part come back to an actor: it finds their
    ok record and returns it without synthesising the row again."""
    import numpy as np

    from voldit.synthesis import Layout, Synthesizer

    fs, output = s3_here, f"s3://{BUCKET}/unjournaled"
    layout = Layout.of(output)
    earlier = {"id": "done", "name": "done", "status": "ok", "seed": 3, "output": "kept"}
    fs.pipe(f"{BUCKET}/unjournaled/records/done.json", json.dumps(earlier).encode())
    fs.pipe(f"{BUCKET}/unjournaled/records/failed.json", json.dumps({**earlier, "status": "failed"}).encode())
    synth = Synthesizer(
        tiny_tgca_run["tgca"], layout.root, settings={"sampler": "ddim", "steps": 2}, remote=output
    )
    names = ["done", "failed", "new"]
    mask = str(crops["rows"][0][1])
    result = synth(
        {"id": np.array(names), "name": np.array(names), "seed": np.arange(3), "mask": np.array([mask] * 3)}
    )
    assert result["reused"] == [True, False, False] and result["error"] == ["", "", ""]
    assert json.loads(result["record"][0]) == earlier
    fs.invalidate_cache()
    volumes = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/unjournaled/volumes"))
    assert volumes == ["failed.nii.gz", "new.nii.gz"]  # the done row was not synthesised again
    assert json.loads(fs.cat(f"{BUCKET}/unjournaled/records/failed.json"))["status"] == "ok"
