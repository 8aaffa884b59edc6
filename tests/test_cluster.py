"""Cluster configs and job entrypoints: the launcher YAML passes Ray's own validation, the KubeRay
manifests run the shipped jobs, and the pipeline job runs through `ray job submit` on a real head node."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT

JOBS = ["train", "encode", "sweep", "synthesize", "pipeline"]


def test_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "voldit-aws.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert config["head_node_type"] == "head" and "gpu_worker" in config["available_node_types"]
    broken = yaml.safe_load((ROOT / "cluster" / "voldit-aws.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["max_workerz"] = 8
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_kuberay_manifests_run_the_shipped_jobs():
    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay-raycluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == "2.60.0"
        gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Every file the RayJob's entrypoint names exists in the image (this checkout at /home/ray/voldit).
    named = re.findall(r"/home/ray/voldit/(\S+)", job["spec"]["entrypoint"])
    assert named and all((ROOT / path).is_file() for path in named)
    assert "FROM rayproject/ray:2.60.0" in (ROOT / "cluster" / "Dockerfile").read_text()


@pytest.mark.parametrize("job", JOBS)
def test_job_entrypoints_reach_their_verbs(job):
    result = subprocess.run(
        [sys.executable, f"jobs/{job}.py", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": "."},  # as jobs/runtime_env.yaml sets it
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"usage: voldit {job}" in result.stdout
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop the head node this test started, and only it: every process naming its temp dir, and theirs."""
    victims = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and any(temp_dir in c for c in process.info["cmdline"] or []):
                victims.add(process)
                victims.update(process.children(recursive=True))
        except psutil.Error:
            pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims), timeout=30)


@pytest.mark.slow
def test_pipeline_job_through_ray_job_submit(tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = f"/tmp/vray-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths live under it
    port, dashboard = _free_port(), _free_port()
    # The job's `python` must be this environment's, as it is on a cluster node built from cluster/.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    start = [ray, "start", "--head", "--port", str(port), "--dashboard-port", str(dashboard)]
    start += ["--num-cpus", "4", "--temp-dir", temp_dir, "--include-dashboard", "true"]
    # Every other port free too: the test session's own Ray (with its dashboard agent) may be running.
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"):
        start += [flag, str(_free_port())]
    for flag in (
        "--ray-client-server-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ):
        start += [flag, str(_free_port())]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        out = tmp_path / "pipeline"
        submit = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", "."]
        submit += [
            "--runtime-env",
            "jobs/runtime_env.yaml",
            "--",
            "python",
            "jobs/pipeline.py",
            "--example-data",
        ]
        submit += ["--cache", str(ROOT / ".cache" / "examples"), "--output", str(out)]
        submit += ["--set", "training.n_epochs=2", "training.log_every_n_steps=1000"]
        began = time.time()
        for _ in range(3):  # the head's job agent may take a moment to come up after `ray start`
            result = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in result.stderr + result.stdout:
                break
            time.sleep(5)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "Job 'raysubmit_" in result.stdout and "succeeded" in result.stdout
        print(f"ray job submit: pipeline job finished in {time.time() - began:.0f} s")
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    for stage in ("vqgan", "dit", "tgca"):
        assert (out / "runs" / stage / "checkpoints" / "best" / "meta.json").is_file()
    assert len(list((out / "synthetic" / "volumes").glob("*.nii.gz"))) == 12
    assert len(list((out / "samples").glob("sample_*.nii.gz"))) == 4
    assert (out / "report" / "report.md").is_file() and (out / "synthetic" / "contact_sheet.png").is_file()
