"""Shared fixtures: tiny configs and models that run on a CPU in milliseconds."""

from __future__ import annotations

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

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
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
