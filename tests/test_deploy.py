"""Deployment files fit for a real cluster: the KubeRay manifests against the KubeRay v1 CRDs (our own compact
copy of the fields we use), the AWS launcher config ships the image instead of pip-installing torch on every
node and gives the head the IAM it needs to start workers, and the Dockerfile caches torch below the tree.
File checks only: each test runs in milliseconds."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"

# ---------------------------------------------------------------------------------------------------------
# KubeRay v1 schema, the parts our manifests use (and a few neighbours a user is likely to add).
# Derived by reading the CRDs of ray-project/kuberay v1.7.0 (commit feeaf72facab4881ba2b179248bb67315634e229,
# v1.7.0-rc.0-5): ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, apiVersion
# ray.io/v1, and the name/replica rules of ray-operator/controllers/ray/utils/validation.go.
# The notation:
#   str, int, bool, (int, float)   a scalar of that type (a bool is not an int)
#   QUANTITY                       a Kubernetes quantity: an int, or a string such as "4", "500m", "16Gi"
#   frozenset({...})               one of these strings
#   {"field": schema, ...}         an object with only these fields; Req(schema) marks a required one
#   {str: schema}                  a map: any keys, every value matching schema
#   [schema]                       a list, every item matching schema
#   dict                           an object whose fields this check does not descend into
# ---------------------------------------------------------------------------------------------------------


class Req:
    """A required field's schema."""

    def __init__(self, schema):
        self.schema = schema


QUANTITY = object()  # the CRD's int-or-string with the Kubernetes quantity pattern
_QUANTITY_RE = re.compile(
    r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?$"
)

STRING_MAP = {str: str}
ENV_VAR = {"name": Req(str), "value": str, "valueFrom": dict}
ENV_FROM = {
    "secretRef": {"name": str, "optional": bool},
    "configMapRef": {"name": str, "optional": bool},
    "prefix": str,
}
RESOURCES = {"requests": {str: QUANTITY}, "limits": {str: QUANTITY}, "claims": [dict]}
VOLUME_MOUNT = {
    "name": Req(str),
    "mountPath": Req(str),
    "readOnly": bool,
    "subPath": str,
    "subPathExpr": str,
    "mountPropagation": str,
}
CONTAINER = {
    "name": Req(str),
    "image": str,
    "imagePullPolicy": frozenset({"Always", "IfNotPresent", "Never"}),
    "command": [str],
    "args": [str],
    "workingDir": str,
    "env": [ENV_VAR],
    "envFrom": [ENV_FROM],
    "resources": RESOURCES,
    "ports": [{"containerPort": Req(int), "name": str, "protocol": str, "hostPort": int, "hostIP": str}],
    "volumeMounts": [VOLUME_MOUNT],
    "securityContext": dict,
    "lifecycle": dict,
    "livenessProbe": dict,
    "readinessProbe": dict,
    "startupProbe": dict,
}
VOLUME = {
    "name": Req(str),
    "persistentVolumeClaim": {"claimName": Req(str), "readOnly": bool},
    "emptyDir": {"medium": str, "sizeLimit": QUANTITY},
    "configMap": dict,
    "secret": dict,
    "hostPath": dict,
    "csi": dict,
}
TOLERATION = {"key": str, "operator": str, "value": str, "effect": str, "tolerationSeconds": int}
POD_TEMPLATE = {  # a Kubernetes PodTemplateSpec
    "metadata": {"name": str, "namespace": str, "labels": STRING_MAP, "annotations": STRING_MAP},
    "spec": Req(
        {
            "containers": Req([CONTAINER]),
            "initContainers": [CONTAINER],
            "volumes": [VOLUME],
            "tolerations": [TOLERATION],
            "nodeSelector": STRING_MAP,
            "affinity": dict,
            "serviceAccountName": str,
            "imagePullSecrets": [{"name": str}],
            "priorityClassName": str,
            "restartPolicy": frozenset({"Always", "OnFailure", "Never"}),
            "terminationGracePeriodSeconds": int,
            "securityContext": dict,
            "runtimeClassName": str,
        }
    ),
}
HEAD_GROUP = {
    "rayStartParams": STRING_MAP,  # `ray start` flags; KubeRay's CRD takes strings only ("0", not 0)
    "template": Req(POD_TEMPLATE),
    "serviceType": str,
    "headService": dict,
    "enableIngress": bool,
    "labels": STRING_MAP,
    "resources": STRING_MAP,
}
WORKER_GROUP = {
    "groupName": Req(str),
    "replicas": int,
    "minReplicas": Req(int),
    "maxReplicas": Req(int),
    "idleTimeoutSeconds": int,
    "numOfHosts": int,
    "rayStartParams": STRING_MAP,
    "template": Req(POD_TEMPLATE),
    "scaleStrategy": {"workersToDelete": [str]},
    "suspend": bool,
    "labels": STRING_MAP,
    "resources": STRING_MAP,
}
AUTOSCALER_OPTIONS = {
    "version": frozenset({"v1", "v2"}),
    "upscalingMode": frozenset({"Default", "Aggressive", "Conservative"}),
    "idleTimeoutSeconds": int,
    "image": str,
    "imagePullPolicy": frozenset({"Always", "IfNotPresent", "Never"}),
    "resources": RESOURCES,
    "env": [ENV_VAR],
    "envFrom": [ENV_FROM],
    "volumeMounts": [VOLUME_MOUNT],
    "securityContext": dict,
    "command": [str],
    "args": [str],
}
RAY_CLUSTER_SPEC = {
    "rayVersion": str,
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": AUTOSCALER_OPTIONS,
    "headGroupSpec": Req(HEAD_GROUP),
    "workerGroupSpecs": [WORKER_GROUP],
    "headServiceAnnotations": STRING_MAP,
    "suspend": bool,
    "managedBy": str,
    "gcsFaultToleranceOptions": dict,
}
METADATA = {"name": Req(str), "namespace": str, "labels": STRING_MAP, "annotations": STRING_MAP}
RAY_JOB_SPEC = {
    "entrypoint": str,
    "runtimeEnvYAML": str,  # a YAML document as one string, not a nested object
    "rayClusterSpec": RAY_CLUSTER_SPEC,
    "clusterSelector": STRING_MAP,
    "shutdownAfterJobFinishes": bool,
    "ttlSecondsAfterFinished": int,
    "activeDeadlineSeconds": int,
    "preRunningDeadlineSeconds": int,
    "backoffLimit": int,
    "submissionMode": frozenset({"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}),
    "submitterPodTemplate": POD_TEMPLATE,
    "submitterConfig": {"backoffLimit": int},
    "entrypointNumCpus": (int, float),
    "entrypointNumGpus": (int, float),
    "entrypointResources": str,
    "jobId": str,
    "metadata": STRING_MAP,
    "suspend": bool,
    "deletionStrategy": dict,
}
SCHEMAS = {
    "RayCluster": {
        "apiVersion": Req(frozenset({"ray.io/v1"})),
        "kind": Req(frozenset({"RayCluster"})),
        "metadata": Req(METADATA),
        "spec": Req(RAY_CLUSTER_SPEC),
    },
    "RayJob": {
        "apiVersion": Req(frozenset({"ray.io/v1"})),
        "kind": Req(frozenset({"RayJob"})),
        "metadata": Req(METADATA),
        "spec": Req(RAY_JOB_SPEC),
    },
}


def _type_name(value) -> str:
    return f"{type(value).__name__} {value!r}"


def schema_errors(value, schema, path: str = "") -> list[str]:
    """Every place `value` leaves `schema`, as 'path: what is wrong' (empty when it fits)."""
    if isinstance(schema, Req):
        schema = schema.schema
    if schema is QUANTITY:
        if isinstance(value, bool) or not isinstance(value, int | str):
            return [f"{path}: expected a quantity (int or string), got {_type_name(value)}"]
        if isinstance(value, str) and not _QUANTITY_RE.match(value):
            return [f"{path}: {value!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')"]
        return []
    if isinstance(schema, frozenset):
        return [] if value in schema else [f"{path}: {value!r} is not one of {sorted(schema)}"]
    if schema is dict:
        return [] if isinstance(value, dict) else [f"{path}: expected an object, got {_type_name(value)}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {_type_name(value)}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, schema[0], f"{path}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {_type_name(value)}"]
        prefix = f"{path}." if path else ""
        if str in schema:  # a map: any key, typed values
            return [e for k, v in value.items() for e in schema_errors(v, schema[str], f"{prefix}{k}")]
        errors = [
            f"{prefix}{k}: required field missing"
            for k, s in schema.items()
            if isinstance(s, Req) and k not in value
        ]
        for key, item in value.items():
            if key not in schema:
                errors.append(f"{prefix}{key}: unknown field (allowed: {', '.join(sorted(schema))})")
            else:
                errors += schema_errors(item, schema[key], f"{prefix}{key}")
        return errors
    types = schema if isinstance(schema, tuple) else (schema,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        return [f"{path}: expected {wanted}, got {_type_name(value)}"]
    return []


_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def manifest_errors(manifest: dict) -> list[str]:
    """The CRD check, plus the KubeRay controller's rules on names and replica counts."""
    kind = manifest.get("kind")
    if kind not in SCHEMAS:
        return [f"kind: {kind!r} is not one of {sorted(SCHEMAS)}"]
    errors = schema_errors(manifest, SCHEMAS[kind])
    if errors:
        return errors
    if not _DNS1035.match(manifest["metadata"]["name"]):
        errors.append(f"metadata.name: {manifest['metadata']['name']!r} is not a DNS-1035 label")
    spec = manifest["spec"]["rayClusterSpec"] if kind == "RayJob" else manifest["spec"]
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        low, high = group["minReplicas"], group["maxReplicas"]
        if not 0 <= low <= group.get("replicas", low) <= high:
            errors.append(
                f"workerGroupSpecs[{i}]: needs 0 <= minReplicas <= replicas <= maxReplicas, "
                f"got {low}, {group.get('replicas')}, {high}"
            )
    return errors


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


MANIFESTS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_fits_the_crd(name):
    assert manifest_errors(_load(name)) == []


def test_kuberay_check_names_a_typo_and_a_non_string_ray_start_param():
    broken = _load("kuberay-raycluster.yaml")
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    worker = broken["spec"]["workerGroupSpecs"][0]
    worker["minReplica"] = worker.pop("minReplicas")
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "64GB"
    errors = manifest_errors(broken)
    assert any(
        e.startswith("spec.headGroupSpec.rayStartParams.num-cpus: expected str, got int") for e in errors
    )
    assert any(e.startswith("spec.workerGroupSpecs[0].minReplica: unknown field") for e in errors)
    assert "spec.workerGroupSpecs[0].minReplicas: required field missing" in errors
    assert any("resources.limits.memory: '64GB' is not a Kubernetes quantity" in e for e in errors)
    job = _load("kuberay-rayjob.yaml")
    job["spec"]["runtimeEnvYAML"] = yaml.safe_load(job["spec"]["runtimeEnvYAML"])  # an object, not a string
    job["spec"]["shutdownAfterJobFinishes"] = "true"
    assert sorted(e.split(":")[0] for e in manifest_errors(job)) == [
        "spec.runtimeEnvYAML",
        "spec.shutdownAfterJobFinishes",
    ]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_gpu_group_starts_at_zero_and_autoscales(name):
    manifest = _load(name)
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = spec["workerGroupSpecs"]
    assert (gpu["replicas"], gpu["minReplicas"]) == (0, 0) and gpu["maxReplicas"] >= 1


# ---------------------------------------------------------------------------------------------------------
# The AWS launcher config and the image.
# ---------------------------------------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (CLUSTER / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_aws_launcher_syncs_the_checkout_lean_and_runs_the_image():
    config = _load("voldit-aws.yaml")
    excluded = " ".join(config["rsync_exclude"])
    assert all(name in excluded for name in (".venv", ".git", "outputs")), excluded
    assert config["rsync_filter"] == [".gitignore"]
    docker = config["docker"]
    assert docker["image"].endswith("/voldit:latest") and docker["container_name"]
    assert docker["pull_before_run"] is True
    assert "--ulimit nofile=65536:65536" in docker["run_options"]
    # No node pip-installs torch: the image has it. Every setup list, global and per node type.
    commands = [
        c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in config[key]
    ]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("worker_setup_commands", [])
    assert not [c for c in commands if "torch" in c], commands
    assert all("--no-deps" in c for c in commands if "pip install" in c), commands
    # The checkout is mounted where the image installed it (editable), so the image's install runs it.
    workdir = next(line.split()[1] for line in _dockerfile() if line.startswith("WORKDIR"))
    assert workdir in config["file_mounts"]


def test_aws_head_may_start_workers():
    config = _load("voldit-aws.yaml")
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]
    worker = nodes["gpu_worker"]["node_config"]
    worker_profile = worker["IamInstanceProfile"]["Arn"]
    assert worker_profile.endswith("/voldit-s3")  # workers read and write the bucket through it
    if "IamInstanceProfile" not in head:
        return  # Ray's default ray-autoscaler-v1 (EC2 + S3); workers would then need PassRole added to it
    head_profile = head["IamInstanceProfile"]["Arn"]
    assert head_profile != worker_profile and "s3" not in head_profile.rsplit("/", 1)[-1]
    # The documented policy for the head's role: the autoscaler's EC2 calls, PassRole for the workers' role, S3.
    policy = json.loads((CLUSTER / "aws-head-policy.json").read_text())
    granted = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            granted.setdefault(action, []).append(statement["Resource"])
    for action in ("ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags"):
        assert action in granted, action
    assert any(r.endswith(":role/voldit-s3") for r in granted["iam:PassRole"])
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= set(granted)
    assert "aws-head-policy.json" in (CLUSTER / "voldit-aws.yaml").read_text()


def test_dockerfile_installs_torch_and_dependencies_before_the_tree():
    lines = _dockerfile()
    assert lines[0].startswith("FROM rayproject/ray:2.60.0")
    tree = next(i for i, line in enumerate(lines) if re.match(r"COPY\b.*\s\.\s+\.$", line))
    torch = next(i for i, line in enumerate(lines) if re.search(r"pip install .*\btorch==", line))
    pyproject = next(i for i, line in enumerate(lines) if re.match(r"COPY\b.*\spyproject\.toml\s", line))
    assert torch < tree and pyproject < tree, lines
    assert any("pip install" in line and "--no-deps -e ." in line for line in lines[tree + 1 :])
    # The torch pin lies in pyproject's range, so installing the dependencies keeps that torch.
    tomllib = pytest.importorskip("tomllib")
    packaging = pytest.importorskip("packaging.requirements")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = re.search(r"torch==(\S+)", lines[torch]).group(1)
    torch_range = next(packaging.Requirement(d) for d in dependencies if d.startswith("torch"))
    assert torch_range.specifier.contains(pin), (pin, str(torch_range))
    # The dependency layer's one-liner, run here on our pyproject.toml, lists exactly its dependencies.
    code = re.search(r'python -c "(.+?)"', next(line for line in lines if "tomllib" in line)).group(1)
    listed = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[:-1] == dependencies


def test_dockerignore_keeps_environments_and_history_out_of_the_context():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "outputs", ".cache", "data", "bench/results"} <= entries
