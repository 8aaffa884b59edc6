"""Checkpoints in the paper authors' layout (built here from random weights) import and reproduce outputs."""

import pytest
import torch

from tests.conftest import randomize
from voldit.builders import build_dit, build_tgca, build_vqgan, model_from_checkpoint
from voldit.checkpoint import CheckpointError, load_checkpoint
from voldit.cli import main
from voldit.config import load_config
from voldit.reference import import_reference


def _authors_dit_file(path, model):
    """What their trainer saves: model (with the empty label table), optimiser, ema = {decay, shadow}."""
    state = dict(model.state_dict())
    state["y_embedder.embedding_table.weight"] = torch.zeros(0, model.hidden_size)
    shadow = {n: p.detach() + 0.01 for n, p in model.named_parameters()}  # EMA differs from the raw weights
    torch.save(
        {
            "epoch": 12,
            "best_loss": 0.1,
            "model": state,
            "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": None,
            "ema": {"decay": 0.9999, "shadow": shadow},
        },
        path,
    )
    return shadow


def test_dit_with_ema_imports_and_reproduces_outputs(tmp_path, tiny_dit_cfg):
    model = randomize(build_dit(tiny_dit_cfg))
    shadow = _authors_dit_file(tmp_path / "best_model.pth", model)
    out = import_reference(tmp_path / "best_model.pth", tiny_dit_cfg, tmp_path / "dit", scale_factor=7.87)
    ckpt = load_checkpoint(out, stage="dit")
    assert ckpt.meta["scale_factor"] == 7.87 and ckpt.meta["epoch"] == 12
    assert ckpt.meta["latent_shape"] == [8, 8, 8, 4]
    x, t = torch.randn(2, 8, 8, 8, 4), torch.tensor([0, 299])
    assert torch.equal(model_from_checkpoint(ckpt, use_ema=False)(x, t), model.eval()(x, t))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shadow[n])
    assert torch.equal(model_from_checkpoint(ckpt)(x, t), model(x, t))


def test_vqgan_state_dict_layouts_import(tmp_path, tiny_vqgan_cfg):
    vq = randomize(build_vqgan(tiny_vqgan_cfg), std=0.02).eval()
    image = torch.rand(1, 1, 64, 64, 32) * 2 - 1
    expected = vq.encode_stage_2_inputs(image)
    for i, blob in enumerate(
        [
            {"model": vq.state_dict(), "discriminator": {}},
            {"state_dict": vq.state_dict()},
            {f"module.{k}": v for k, v in vq.state_dict().items()},
        ]
    ):
        torch.save(blob, tmp_path / f"vq{i}.pth")
        rebuilt = model_from_checkpoint(
            load_checkpoint(import_reference(tmp_path / f"vq{i}.pth", tiny_vqgan_cfg, tmp_path / f"out{i}"))
        )
        assert torch.equal(rebuilt.encode_stage_2_inputs(image), expected)


def test_tgca_imports(tmp_path, tiny_tgca_cfg):
    tgca = randomize(build_tgca(tiny_tgca_cfg), seed=3)
    state = dict(tgca.state_dict())
    state["base_model.y_embedder.embedding_table.weight"] = torch.zeros(0, 64)
    torch.save({"model": state, "ema": None}, tmp_path / "tgca.pth")
    rebuilt = model_from_checkpoint(
        load_checkpoint(import_reference(tmp_path / "tgca.pth", tiny_tgca_cfg, tmp_path / "t"))
    )
    x, t, c = torch.randn(1, 8, 8, 8, 4), torch.tensor([9]), torch.rand(1, 1, 64, 64, 32)
    assert torch.equal(rebuilt(x, t, c), tgca.eval()(x, t, c))


def test_wrong_architecture_is_a_clear_error(tmp_path, tiny_dit_cfg):
    _authors_dit_file(tmp_path / "m.pth", randomize(build_dit(tiny_dit_cfg)))
    other = load_config(tiny_dit_cfg, overrides=["dit.params.depth=3"])
    with pytest.raises(CheckpointError, match="does not fit the dit architecture"):
        import_reference(tmp_path / "m.pth", other, tmp_path / "x")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        import_reference(tmp_path / "junk.pth", tiny_dit_cfg, tmp_path / "y")


def test_cli_import_reference(tmp_path, tiny_dit_cfg, capsys):
    _authors_dit_file(tmp_path / "m.pth", randomize(build_dit(tiny_dit_cfg)))
    code = main(
        [
            "import-reference",
            "--checkpoint",
            str(tmp_path / "m.pth"),
            "--config",
            "configs/tiny/dit.yaml",
            "--output",
            str(tmp_path / "ck"),
            "--scale-factor",
            "3.0",
        ]
    )
    assert code == 0 and load_checkpoint(tmp_path / "ck").meta["scale_factor"] == 3.0
    assert (
        main(
            [
                "import-reference",
                "--checkpoint",
                str(tmp_path / "none.pth"),
                "--config",
                "configs/tiny/dit.yaml",
                "--output",
                str(tmp_path / "z"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
