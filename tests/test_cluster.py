"""Cluster configs and job entrypoints: the launcher YAML passes Ray's own validation, the KubeRay
manifests run the shipped jobs, and every entrypoint reaches its verb. The jobs themselves run through
`ray job submit` on the multi-node test cluster in tests/test_cluster_verbs.py."""

import os
import re
import subprocess
import sys

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
