"""Every verb through `ray job submit` on the multi-node test cluster (tests/multinode.py), with S3 for
all data and outputs: the pipeline (VQ-GAN, encode, VolDiT, samples, TGCA, synthesis), a sweep, and
the faults a real cluster has: a worker node lost in the middle of training and of synthesis."""

import json
import threading
import time

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT
from tests.multinode import NODE_ENV

pytestmark = pytest.mark.slow

QUIET = ["training.log_every_n_steps=1000"]
NODE_CACHE = NODE_ENV["VOLDIT_CACHE"]  # every node's own cache (a tmpfs of its own)


def _keys(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return list(fs.find(prefix))


def _no_half_written(fs, bucket: str) -> None:
    """Nothing under a temporary name, and every checkpoint folder complete (meta.json present)."""
    keys = _keys(fs, bucket)
    ours = [k for k in keys if not k.endswith("/.validate_storage_marker")]  # Ray Train's own, complete
    hidden = [k for k in ours if any(part.startswith(".") for part in k.split("/")[1:])]
    assert not hidden, hidden[:5]
    folders = {k.rsplit("/", 1)[0] for k in keys if "/checkpoints/" in k}
    incomplete = [f for f in folders if f.count("/checkpoints/") and f"{f}/meta.json" not in keys]
    assert not incomplete, incomplete[:5]


def _nodes_of(cluster, class_part: str) -> set[str]:
    """The nodes on which actors whose class or repr name contains ``class_part`` ran (alive or dead)."""
    actors = cluster._api("/api/v0/actors?limit=10000&detail=true")["data"]["result"]["result"]
    named = (f"{a.get('class_name')} {a.get('repr_name')}" for a in actors)  # Ray Data's: MapWorker(...)
    return {a["node_id"] for a, name in zip(actors, named, strict=True) if class_part in name}


def _submit_in_background(cluster, args: list, timeout: float = 1200):
    """A job submitted from a thread (so the test can act while it runs); its result lands in the dict."""
    result: dict = {}

    def run():
        result["code"], result["output"] = cluster.submit(args, timeout=timeout)

    job = threading.Thread(target=run, daemon=True)
    job.start()
    return job, result


@pytest.fixture(scope="module")
def pipeline_run(cluster, s3_server, examples):
    """The whole pipeline as one cluster job on the example CT, every path in S3, 2 workers per step."""
    bucket = s3_server["bucket_for"]("pipeline")
    out = f"s3://{bucket}/run"
    began = time.time()
    code, output = cluster.submit(
        ["jobs/pipeline.py", "--example-data", "--cache", ROOT / ".cache" / "examples", "--output", out,
         "--workers", "2", "--no-qc", "--set", "training.n_epochs=1", *QUIET],
        timeout=1500,
    )  # fmt: skip
    print(f"pipeline job on the cluster: {time.time() - began:.0f} s")
    assert code == 0 and "succeeded" in output, output[-6000:]
    return {"bucket": bucket, "out": out, "output": output}


def test_a_cluster_job_shows_its_own_progress_not_rays(pipeline_run):
    """Ray's INFO lines (dataset plans, per-report and checkpoint notices, worker group set-up) stay off
    the job's output on every node; each stage's epoch line comes once, from rank 0 of its 2 workers."""
    output = pipeline_run["output"]
    for notice in (
        "Execution plan of Dataset",
        "Starting execution of Dataset",
        "Reporting training result",
        "Checkpoint successfully created",
        "Attempting to start training worker group",
        "Progress bars disabled",
    ):
        assert notice not in output, notice
    for stage in ("vqgan", "dit", "tgca"):
        lines = [line for line in output.splitlines() if f"[{stage}] epoch 1/1 done at step" in line]
        assert len(lines) == 1, (stage, lines)


def test_pipeline_job_on_a_multi_node_cluster_with_s3(
    pipeline_run, cluster, s3_server, monkeypatch, tmp_path
):
    from voldit.builders import model_from_checkpoint
    from voldit.checkpoint import load_checkpoint
    from voldit.data.nifti import read_volume

    fs, out = s3_server["fs"], pipeline_run["out"]
    inner = out[len("s3://") :]
    manifest = pd.read_csv(fs.open(f"{inner}/synthetic/manifest.csv"), dtype=str, keep_default_na=False)
    assert len(manifest) == 12 and (manifest["status"] == "ok").all(), manifest[["id", "error"]]
    keys = _keys(fs, inner)
    for folder, suffix in (("volumes", ".nii.gz"), ("previews", ".png"), ("records", ".json")):
        names = [k for k in keys if k.startswith(f"{inner}/synthetic/{folder}/")]
        assert len(names) == len(set(names)) == 12 and all(n.endswith(suffix) for n in names), folder
    assert len([k for k in keys if k.startswith(f"{inner}/samples/") and k.endswith(".nii.gz")]) == 4
    _no_half_written(fs, pipeline_run["bucket"])
    # The driver (this process, with a cache of its own) loads every stage's checkpoint from the bucket.
    monkeypatch.setenv("VOLDIT_CACHE", str(tmp_path / "cache"))
    for name, value in s3_server["env"].items():
        monkeypatch.setenv(name, value)
    for stage in ("vqgan", "dit", "tgca"):
        checkpoint = load_checkpoint(f"{out}/runs/{stage}/checkpoints/best", stage=stage)
        model_from_checkpoint(checkpoint)
    # Two train workers per stage, on two nodes: one epoch of 10 rows is 2 steps of batch 2 on each.
    assert len(_nodes_of(cluster, "RayTrainWorker")) >= 2
    for stage in ("vqgan", "dit", "tgca"):
        meta = json.loads(fs.cat(f"{inner}/runs/{stage}/checkpoints/latest/meta.json"))
        assert (meta["epoch"], meta["step"]) == (1, 2), (stage, meta)
        assert fs.glob(f"{inner}/runs/{stage}/tensorboard/events.out.tfevents.*"), stage
    # A synthetic volume lies on its mask's grid; no secret is written with the outputs.
    row = manifest.iloc[0]
    volume, mask = (read_volume(url) for url in (row["output"], row["mask"]))
    assert volume.array.shape == mask.array.shape and np.allclose(volume.affine, mask.affine, atol=1e-5)
    written = fs.cat(f"{inner}/synthetic/run.json") + fs.cat(
        f"{inner}/runs/tgca/checkpoints/best/config.yaml"
    )
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"].encode() not in written
    # Nothing stays staged on any node once uploaded: no checkpoint of the runs, no row's files.
    for node in cluster.nodes.values():
        cache = node.view(NODE_CACHE)
        staged = list(cache.glob("runs/**/meta.json"))
        staged += [
            p for sub in ("volumes", "previews", "records") for p in cache.glob(f"synthesize/*/{sub}/*")
        ]
        assert not staged, (node.name, staged[:5])


def test_sample_takes_a_checkpoint_and_an_output_in_s3(pipeline_run, s3_server, tmp_path):
    import os
    import subprocess
    import sys

    out = pipeline_run["out"]
    env = {**os.environ, **s3_server["env"], "VOLDIT_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": "local"}
    result = subprocess.run(
        [sys.executable, "-m", "voldit", "sample", "--checkpoint", f"{out}/runs/dit/checkpoints/best",
         "--output", f"{out}/more-samples", "--n-samples", "1", "--steps", "5", "--sampler", "ddim"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    keys = _keys(s3_server["fs"], f"{out[5:]}/more-samples")
    names = sorted(k.rsplit("/", 1)[-1] for k in keys)
    assert names == ["sample_000.nii.gz", "sample_000.png", "samples.json"], names
    assert not (ROOT / "s3:").exists()


def test_local_storage_is_refused_on_a_multi_node_cluster(pipeline_run, cluster):
    began = time.time()
    code, output = cluster.submit(
        ["jobs/train.py", "configs/tiny/dit.yaml", "--stage", "dit", "--train",
         f"{pipeline_run['out']}/latents/train", "--storage", "outputs/runs", "--name", "refused"],
        timeout=300,
    )  # fmt: skip
    assert code != 0
    assert "is a local folder, but the Ray cluster has" in output and "--shared-dir" in output, output[-3000:]
    assert "Traceback" not in output
    print(
        f"refused in {time.time() - began:.0f} s: {[line for line in output.splitlines() if 'error' in line]}"
    )


def test_training_survives_a_lost_node(pipeline_run, cluster, s3_server):
    """Kill a worker node in the middle of a 2-worker run with --max-failures 1: the run restarts from
    its last (mid-epoch) checkpoint in the bucket and finishes with the full step count."""
    fs, out = s3_server["fs"], pipeline_run["out"]
    storage = f"s3://{pipeline_run['bucket']}/fault-runs"
    latest = f"{storage[5:]}/ddp/checkpoints/latest/meta.json"
    job, result = _submit_in_background(
        cluster,
        ["jobs/train.py", "configs/tiny/dit.yaml", "--stage", "dit", "--train", f"{out}/latents/train",
         "--val", f"{out}/latents/val", "--storage", storage, "--name", "ddp", "--workers", "2",
         "--max-failures", "1", "--set", "training.n_epochs=4", "training.checkpoint_every_steps=1",
         "training.eval_freq=2", *QUIET],
    )  # fmt: skip
    deadline = time.time() + 900
    while not fs.exists(latest) and job.is_alive() and time.time() < deadline:
        time.sleep(1)
        fs.invalidate_cache()
    assert fs.exists(latest), result.get("output", "")[-4000:]
    victim = next(name for name in cluster.nodes if name != "head")
    cluster.kill_node(victim)
    print(f"killed node {victim} after the checkpoint of step {json.loads(fs.cat(latest))['step']}")
    cluster.add_node(victim)  # the autoscaler's replacement (same name: later tests pin work to it)
    job.join(timeout=1200)
    assert result.get("code") == 0, result.get("output", "")[-6000:]
    meta = json.loads(fs.cat(latest))
    assert (meta["epoch"], meta["step"]) == (4, 8)  # 10 rows / 2 workers / batch 2 = 2 steps per epoch
    _no_half_written(fs, pipeline_run["bucket"])


def test_synthesis_survives_a_lost_node_and_a_rerun_writes_only_the_missing_rows(
    pipeline_run, cluster, s3_server
):
    fs, out = s3_server["fs"], pipeline_run["out"]
    target = f"s3://{pipeline_run['bucket']}/fault-synthetic"
    args = ["jobs/synthesize.py", "--csv", f"{out}/data/masks.csv", "--tgca", f"{out}/runs/tgca/checkpoints/best",
            "--output", target, "--workers", "2", "--batch-size", "1", "--steps", "20", "--sampler", "ddim"]  # fmt: skip
    records = f"{target[5:]}/records"
    job, result = _submit_in_background(cluster, args)
    deadline = time.time() + 600
    while job.is_alive() and time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(records) and len(fs.ls(records)) >= 3:
            break
        time.sleep(1)
    victim = next(name for name in cluster.nodes if name != "head")
    cluster.kill_node(victim)
    cluster.add_node(victim)
    job.join(timeout=900)
    print(f"first synthesis job after losing {victim}: exit {result.get('code')}")
    fs.invalidate_cache()
    before = {k: fs.info(k)["LastModified"] for k in _keys(fs, f"{target[5:]}/volumes")}
    assert before  # the rows finished before the node died are kept
    code, output = cluster.submit(args, timeout=900)
    assert code == 0 and "succeeded" in output, output[-6000:]
    fs.invalidate_cache()
    after = {k: fs.info(k)["LastModified"] for k in _keys(fs, f"{target[5:]}/volumes")}
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())  # only the missing rows
    manifest = pd.read_csv(fs.open(f"{target[5:]}/manifest.csv"), dtype=str, keep_default_na=False)
    assert len(manifest) == 12 and (manifest["status"] == "ok").all(), manifest[["id", "error"]]
    _no_half_written(fs, pipeline_run["bucket"])
    assert len(_nodes_of(cluster, "Synthesizer")) >= 2  # actors on both worker nodes, over the two jobs


def test_sweep_job_on_the_cluster(pipeline_run, cluster, s3_server):
    out = pipeline_run["out"]
    storage = f"s3://{pipeline_run['bucket']}/sweeps"
    code, output = cluster.submit(
        ["jobs/sweep.py", "configs/tiny/dit.yaml", "--train", f"{out}/latents/train", "--val", f"{out}/latents/val",
         "--models", "xs4", "--grid", "optim.lr=1e-3", "--storage", storage, "--name", "sw",
         "--set", "training.n_epochs=1", "dit.params.depth=1", *QUIET],
        timeout=1200,
    )  # fmt: skip
    assert code == 0 and "succeeded" in output, output[-6000:]
    fs = s3_server["fs"]
    table = pd.read_csv(fs.open(f"{storage[5:]}/sw/results.csv"))
    assert len(table) == 1 and table["best_val_loss"].notna().all(), table
    assert fs.exists(f"{storage[5:]}/sw/trials")
