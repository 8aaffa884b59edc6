"""Shared fixtures: tiny configs and models that run on a CPU in milliseconds."""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest
import torch

from voldit.config import load_config
from voldit.models.dit import DiT3D

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values, so zero-initialised layers do real work in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


_STDERR = -1  # the terminal's stderr, kept before pytest captures it (a dump to the capture is lost on exit)


def pytest_configure(config):
    global _STDERR
    _STDERR = os.dup(2)


# Every test without a deadline of its own: several times the slowest test's 3 minutes on 2 busy cores.
DEFAULT_DEADLINE = 1200


@pytest.fixture(autouse=True)
def _deadline(request):
    """``@pytest.mark.deadline(seconds)`` (else DEFAULT_DEADLINE): a test still running after ``seconds``
    dumps every thread's stack and ends the session, so a hang fails loudly instead of blocking the suite."""
    marker = request.node.get_closest_marker("deadline")
    seconds = marker.args[0] if marker else DEFAULT_DEADLINE
    faulthandler.dump_traceback_later(seconds, exit=True, file=_STDERR)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def tiny_dit() -> DiT3D:
    torch.manual_seed(0)
    return randomize(
        DiT3D(
            input_size=(4, 4, 4),
            patch_size=2,
            in_channels=4,
            hidden_size=32,
            depth=2,
            num_heads=4,
            dropout=0.0,
        )
    ).eval()


@pytest.fixture
def tiny_dit_cfg():
    return load_config(CONFIGS / "tiny" / "dit.yaml")


@pytest.fixture
def tiny_tgca_cfg():
    return load_config(CONFIGS / "tiny" / "dit.yaml", CONFIGS / "tiny" / "tgca.yaml")


@pytest.fixture
def tiny_vqgan_cfg():
    return load_config(CONFIGS / "tiny" / "vqgan.yaml")


@pytest.fixture(scope="session")
def examples():
    """Real CT volumes with organ label maps (TotalSegmentator examples, CC BY 4.0), cached in .cache/."""
    from voldit.data.examples import fetch_examples

    return fetch_examples(ROOT / ".cache" / "examples")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (4 logical CPUs so train workers and data steps fit)."""
    import ray

    # The dashboard's state API is how Ray Train's placement-group cleaner sees a finished Tune trial.
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_vqgan_checkpoint(tmp_path_factory):
    """An untrained tiny VQ-GAN checkpoint: a real model, deterministic, for encode and decode tests."""
    from voldit.builders import build_vqgan
    from voldit.checkpoint import save_checkpoint

    cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqgan") / "vqgan"
    return save_checkpoint(
        path, config=cfg, stage="vqgan", model=build_vqgan(cfg).state_dict(), meta={"step": 0}
    )


def write_csv(path, rows, header="image,mask"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def crops(examples, tmp_path_factory):
    from voldit.data.examples import write_crops

    folder = tmp_path_factory.mktemp("crops")
    rows = write_crops(folder, examples)
    return {
        "train": write_csv(folder / "train.csv", rows[:10]),
        "val": write_csv(folder / "val.csv", rows[10:]),
        "rows": rows,
    }


@pytest.fixture(scope="session")
def crop_latents(crops, tmp_path_factory):
    """Latents (+ masks) of the real CT crops, encoded in-process with a VQ-GAN given random weights
    of larger spread, so that different crops give different codes."""
    import numpy as np

    from voldit.builders import build_vqgan
    from voldit.checkpoint import save_checkpoint
    from voldit.data.latents import summarise
    from voldit.data.preprocess import Grid
    from voldit.encode import Encoder

    cfg = load_config(CONFIGS / "tiny" / "vqgan.yaml")
    root = tmp_path_factory.mktemp("latents")
    vq = build_vqgan(cfg)
    randomize(vq, seed=1, std=0.2)
    vq_path = save_checkpoint(root / "vqgan", config=cfg, stage="vqgan", model=vq.state_dict())
    encoder = Encoder(vq_path, root / "train", ["mask"])
    out = {"vqgan": vq_path}
    for split, rows in (("train", crops["rows"][:10]), ("val", crops["rows"][10:])):
        encoder.output = root / split
        for start in range(0, len(rows), 4):
            chunk = rows[start : start + 4]
            encoder(
                {
                    "id": np.array([Path(r[0]).name.split(".")[0] for r in chunk]),
                    "image": np.array([str(r[0]) for r in chunk]),
                    "mask": np.array([str(r[1]) for r in chunk]),
                }
            )
        summarise(root / split, Grid.of(cfg), ["mask"], str(vq_path))
        out[split] = root / split
    return out


@pytest.fixture(scope="session")
def tiny_tgca_run(crop_latents, tmp_path_factory, ray_session):
    """A tiny VolDiT and a TGCA on it, each trained briefly in-process on the real CT crop latents;
    their checkpoints record the VQ-GAN and the mask labels they were trained with."""
    from voldit.distributed.train import train

    storage = tmp_path_factory.mktemp("runs")
    quiet = ["training.n_epochs=2", "training.eval_freq=1", "training.log_every_n_steps=1000"]
    data = (str(crop_latents["train"]), str(crop_latents["val"]))
    dit = train(
        load_config(CONFIGS / "tiny" / "dit.yaml", overrides=quiet),
        "dit",
        *data,
        name="dit",
        storage=storage,
        workers=0,
    )
    tgca = train(
        load_config(CONFIGS / "tiny" / "tgca.yaml", overrides=quiet),
        "tgca",
        *data,
        dit=str(dit.best),
        name="tgca",
        storage=storage,
        workers=0,
    )
    return {"dit": dit.best, "dit_run": dit.run_dir, "tgca": tgca.best, "vqgan": crop_latents["vqgan"]}


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on a free loopback port for the whole test session: ``env``, the variables a
    process needs to reach it; ``fs``, an fsspec filesystem on it; ``bucket_for(prefix)``, which makes
    a fresh bucket and returns its name."""
    import socket
    import subprocess
    import sys
    import time
    import uuid

    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "voldit-test-key",
            "AWS_SECRET_ACCESS_KEY": "voldit-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        fs = fsspec.filesystem(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )

        def bucket_for(prefix: str = "voldit") -> str:
            bucket = f"{prefix.lower().replace('_', '-')[:40]}-{uuid.uuid4().hex[:8]}"
            fs.mkdir(bucket)
            return bucket

        yield {"env": env, "fs": fs, "bucket_for": bucket_for}
    finally:
        server.kill()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def cluster(s3_server):
    """A multi-node Ray cluster on this machine for the whole session (tests/multinode.py): a head that
    runs no work and worker nodes w1, w2 with private local disks, all reaching ``s3_server``."""
    import time

    from tests.multinode import Cluster

    began = time.time()
    ray_cluster = Cluster(s3_env=s3_server["env"])
    try:
        ray_cluster.start()
        print(
            f"\nmulti-node Ray cluster started in {time.time() - began:.0f} s:",
            *ray_cluster.start_log,
            sep="\n  ",
        )
        yield ray_cluster
    finally:
        ray_cluster.stop()


def kill_when(command, ready, env, cwd=ROOT, timeout=300):
    """Start ``command`` in its own session, wait until ``ready()`` (or it exits, or ``timeout``), then
    SIGKILL it and every process it started (Ray's own processes leave its process group)."""
    import contextlib
    import os
    import signal
    import subprocess
    import time

    import psutil

    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    victims = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    process.wait()
    psutil.wait_procs(victims, timeout=30)
