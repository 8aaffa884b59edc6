import numpy as np
import pytest
import torch

from tests.conftest import randomize
from voldit.builders import build_dit, build_tgca, model_from_checkpoint
from voldit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from voldit.models.ema import EMA


def _train_one_step(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(2, 8, 8, 8, 4), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    return opt


def test_round_trip_rebuilds_the_model_and_its_training_state(tmp_path, tiny_dit_cfg):
    model = randomize(build_dit(tiny_dit_cfg))
    ema = EMA(model, 0.5)
    opt = _train_one_step(model)
    ema.update()
    state = {
        "optimizer": opt.state_dict(),
        "step": 7,
        "rng": torch.get_rng_state(),
        "numpy_rng": np.random.default_rng(3).bit_generator.state,
        "py": (1, 2.5, None, "x"),
    }
    path = save_checkpoint(
        tmp_path / "ckpt",
        config=tiny_dit_cfg,
        stage="dit",
        model=model.state_dict(),
        ema=ema.state_dict(),
        training_state=state,
        meta={"step": 7, "scale_factor": 2.5, "latent_shape": [8, 8, 8, 4]},
    )
    ckpt = load_checkpoint(path, stage="dit")
    assert ckpt.meta["scale_factor"] == 2.5 and ckpt.meta["versions"]["torch"] == torch.__version__
    x, t = torch.randn(1, 8, 8, 8, 4), torch.tensor([5])
    raw = model_from_checkpoint(ckpt, use_ema=False)
    assert torch.equal(raw(x, t), model.eval()(x, t))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema.shadow[name])
    assert torch.equal(model_from_checkpoint(ckpt)(x, t), model(x, t))
    restored = ckpt.training_state()
    assert restored["step"] == 7 and restored["py"] == (1, 2.5, None, "x")
    assert torch.equal(restored["rng"], state["rng"])
    assert restored["numpy_rng"] == state["numpy_rng"]
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(restored["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary directories left behind


def test_overwrite_is_atomic_and_complete(tmp_path, tiny_dit_cfg):
    model = build_dit(tiny_dit_cfg)
    for step in (1, 2):
        save_checkpoint(
            tmp_path / "latest",
            config=tiny_dit_cfg,
            stage="dit",
            model=model.state_dict(),
            meta={"step": step},
        )
    assert load_checkpoint(tmp_path / "latest").meta["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_tgca_checkpoint_is_self_contained(tmp_path, tiny_tgca_cfg):
    tgca = randomize(build_tgca(tiny_tgca_cfg), seed=4)
    path = save_checkpoint(tmp_path / "t", config=tiny_tgca_cfg, stage="tgca", model=tgca.state_dict())
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    x, t, c = torch.randn(1, 8, 8, 8, 4), torch.tensor([3]), torch.rand(1, 1, 64, 64, 32)
    assert torch.equal(rebuilt(x, t, c), tgca.eval()(x, t, c))


def test_checkpoint_saved_before_attention_dropout_loads(tmp_path, tiny_dit_cfg):
    """A config.yaml written before dit.params.attention_dropout existed: the schema's default (0, the
    authors' trained recipe) fills it in and the weights load as they are (dropout holds no parameters)."""
    import yaml

    model = randomize(build_dit(tiny_dit_cfg))
    path = save_checkpoint(tmp_path / "old", config=tiny_dit_cfg, stage="dit", model=model.state_dict())
    saved = yaml.safe_load((path / "config.yaml").read_text())
    del saved["dit"]["params"]["attention_dropout"]
    (path / "config.yaml").write_text(yaml.safe_dump(saved))
    ckpt = load_checkpoint(path)
    assert ckpt.config.dit.params.attention_dropout == 0.0
    x, t = torch.randn(1, 8, 8, 8, 4), torch.tensor([5])
    assert torch.equal(model_from_checkpoint(ckpt)(x, t), model.eval()(x, t))


def test_errors_name_the_problem(tmp_path, tiny_dit_cfg):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load_checkpoint(tmp_path / "half")
    path = save_checkpoint(
        tmp_path / "d", config=tiny_dit_cfg, stage="dit", model=build_dit(tiny_dit_cfg).state_dict()
    )
    with pytest.raises(CheckpointError, match="is a 'dit' checkpoint, expected a 'tgca' one"):
        load_checkpoint(path, stage="tgca")
    state = build_dit(tiny_dit_cfg).state_dict()
    state.pop("final_layer.linear.bias")
    bad = save_checkpoint(tmp_path / "bad", config=tiny_dit_cfg, stage="dit", model=state)
    with pytest.raises(CheckpointError, match="does not match its own config"):
        model_from_checkpoint(load_checkpoint(bad))
    with pytest.raises(CheckpointError, match="no ema weights"):
        load_checkpoint(bad).weights("ema")
