"""The test suite's multi-node Ray cluster (tests/multinode.py) behaves like a real one: a head that runs
no work, worker nodes on their own addresses whose local disks no one else sees, and nodes that die
and are replaced."""

import json
import os
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _driver(cluster, code: str, timeout: float = 180):
    """Run ``code`` as a Ray driver on the cluster; it prints one JSON line, returned decoded."""
    code = "import json, os, ray\nray.init(log_to_driver=False)\n" + textwrap.dedent(code)
    result = cluster.python(code, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_head_runs_no_work_and_workers_have_their_own_addresses(cluster):
    alive = {n["node_id"]: n for n in cluster.node_states() if n["state"] == "ALIVE"}
    assert set(alive) == {node.node_id for node in cluster.nodes.values()} and len(alive) >= 3
    head = alive[cluster.nodes["head"].node_id]
    assert head["is_head_node"] and head["resources_total"].get("CPU", 0) == 0
    workers = [node for node in cluster.nodes.values() if node.name != "head"]
    assert len({node.ip for node in workers}) == len(workers) >= 2
    for node in workers:
        assert alive[node.node_id]["node_ip"] == node.ip and node.ip.startswith("127.0.0.")
        assert alive[node.node_id]["resources_total"][f"voldit_{node.name}"] == 1
    assert all(alive[cluster.nodes[name].node_id]["resources_total"]["CPU"] == 2 for name in ("w1", "w2"))
    assert len({node.namespace for node in cluster.nodes.values()}) == len(cluster.nodes)


def test_a_nodes_cache_is_its_own(cluster):
    name = f"marker-{uuid.uuid4().hex[:8]}"
    seen = _driver(
        cluster,
        f"""
        def on(node):
            return ray.remote(num_cpus=1, resources={{f"voldit_{{node}}": 0.01}})

        @on("w1")
        def write():
            path = os.path.join(os.environ["VOLDIT_CACHE"], "{name}")
            with open(path, "w") as f:
                f.write("w1")
            return path

        @on("w1")
        def read(path):
            with open(path) as f:
                return f.read()

        @on("w2")
        def look(path):
            return os.environ["VOLDIT_CACHE"], os.path.exists(path)

        path = ray.get(write.remote(), timeout=120)
        cache, w2_sees = ray.get(look.remote(path), timeout=120)
        again = ray.get(read.remote(path), timeout=120)
        print(json.dumps({{"path": path, "w2": [cache, w2_sees], "w1": again, "driver": os.path.exists(path)}}))
        """,
    )
    path = seen["path"]
    assert path == os.path.join("/tmp/voldit-node/cache", name)  # the same cache path on both nodes
    assert seen["w1"] == "w1" and seen["w2"] == ["/tmp/voldit-node/cache", False]
    assert not seen["driver"] and not Path(path).exists()  # neither the driver nor this process
    assert cluster.nodes["w1"].view(path).read_text() == "w1"
    assert not cluster.nodes["w2"].view(path).exists() and not cluster.nodes["head"].view(path).exists()


def test_a_submitted_job_drives_from_the_head_and_its_tasks_reach_s3(cluster, s3_server):
    url = f"s3://{s3_server['bucket_for']('multinode')}/from-w1.txt"
    code = f"""
import json, fsspec, ray
ray.init()

@ray.remote(num_cpus=1, resources={{"voldit_w1": 0.01}})
def put(url):
    with fsspec.open(url, "w") as f:
        f.write(ray.get_runtime_context().get_node_id())

ray.get(put.remote("{url}"), timeout=120)
print("DRIVER", json.dumps(ray.get_runtime_context().get_node_id()))
"""
    returncode, output = cluster.submit(["-c", code], timeout=300)
    assert returncode == 0 and "succeeded" in output, output[-4000:]
    driver = json.loads(output.split("DRIVER ", 1)[1].splitlines()[0])
    assert driver == cluster.nodes["head"].node_id  # Ray runs a job's driver on the head
    assert s3_server["fs"].cat(url[len("s3://") :]).decode() == cluster.nodes["w1"].node_id


def test_a_killed_node_is_dead_and_replaced(cluster):
    began = time.time()
    dead = cluster.kill_node("w2")
    print(f"\nkilled node w2: the GCS listed it dead {time.time() - began:.1f} s later")
    try:
        assert not dead.pids()
        states = {n["node_id"]: n["state"] for n in cluster.node_states()}
        assert states[dead.node_id] == "DEAD"
        on_w1 = _driver(
            cluster,
            """
            @ray.remote(num_cpus=1, resources={"voldit_w1": 0.01})
            def where():
                return ray.get_runtime_context().get_node_id()

            print(json.dumps(ray.get(where.remote(), timeout=120)))
            """,
        )
        assert on_w1 == cluster.nodes["w1"].node_id
    finally:
        began = time.time()
        replacement = cluster.add_node("w2")  # the next tests get a cluster as they expect it
        print(f"a replacement w2 joined in {time.time() - began:.1f} s")
    assert replacement.ip != dead.ip and replacement.node_id != dead.node_id
    on_w2 = _driver(
        cluster,
        """
        @ray.remote(num_cpus=1, resources={"voldit_w2": 0.01})
        def where():
            return ray.get_runtime_context().get_node_id(), os.listdir(os.environ["VOLDIT_CACHE"])

        print(json.dumps(ray.get(where.remote(), timeout=120)))
        """,
    )
    assert on_w2 == [replacement.node_id, []]  # a fresh node: an empty cache
