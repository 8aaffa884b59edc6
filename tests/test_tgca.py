import math

import pytest
import torch

from tests.conftest import CONFIGS, randomize
from voldit.builders import build_tgca, count_parameters
from voldit.config import load_config
from voldit.models.tgca import TGCA3D


def _tgca(base, **kwargs):
    return TGCA3D(base, condition_channels=2, **kwargs)


@pytest.mark.parametrize(("dit", "expected"), [("xs4", 1_769_103), ("l4", 4_424_865)])
def test_trainable_parameters_match_paper(dit, expected):
    cfg = load_config(CONFIGS / "transformer" / f"dit_ds8_{dit}.yaml", CONFIGS / "tgca" / "tgca_ds8.yaml")
    with torch.device("meta"):
        assert count_parameters(build_tgca(cfg))[0] == expected


def test_initial_tgca_reproduces_base_exactly(tiny_dit):
    tgca = _tgca(tiny_dit).eval()
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([3, 250])
    condition = torch.rand(2, 2, 32, 32, 32)
    assert torch.equal(tgca(x, t, condition), tiny_dit(x, t))


def test_base_weights_bit_identical_after_optimiser_step(tiny_dit):
    before = {k: v.clone() for k, v in tiny_dit.state_dict().items()}
    tgca = _tgca(tiny_dit, condition_dropout_prob=0.0)
    randomize(tgca.condition_embedder, seed=1)  # make the adapter's gradient non-zero
    trainable = [p for p in tgca.parameters() if p.requires_grad]
    adapter_before = [p.clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    loss = (
        tgca(torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 2]), torch.rand(2, 2, 32, 32, 32)).square().mean()
    )
    loss.backward()
    opt.step()
    for key, value in tiny_dit.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(adapter_before, trainable, strict=True))


def test_frozen_base_stays_in_eval_mode(tiny_dit):
    tgca = _tgca(tiny_dit).train()
    assert tgca.training and tgca.condition_embedder.training
    assert not any(m.training for m in tgca.base_model.modules())


def test_finetune_last_blocks_unfreezes_them_and_final_layer(tiny_dit):
    tgca = _tgca(tiny_dit, finetune_last_n_blocks=1).train()
    assert all(p.requires_grad for p in tiny_dit.blocks[1].parameters())
    assert all(p.requires_grad for p in tiny_dit.final_layer.parameters())
    assert not any(p.requires_grad for p in tiny_dit.blocks[0].parameters())
    assert tiny_dit.blocks[1].training and not tiny_dit.blocks[0].training
    assert not any(k.startswith("_finetuned") for k in tgca.state_dict())  # shared modules saved once


def test_inject_last_n_layers(tiny_dit):
    assert _tgca(tiny_dit, inject_layers=1).inject_layers == [1]
    assert _tgca(tiny_dit).inject_layers == [0, 1]
    with pytest.raises(ValueError, match="inject_layers"):
        _tgca(tiny_dit, inject_layers=3)


def test_condition_dropout_zeroes_whole_samples(tiny_dit):
    torch.manual_seed(0)
    tgca = _tgca(tiny_dit, condition_dropout_prob=0.5)
    dropped = tgca.drop_condition(torch.ones(1000, 2, 2, 2, 2))
    per_sample = dropped.flatten(1)
    assert set(per_sample.sum(1).tolist()) == {0.0, 16.0}  # all of a sample, or none of it
    assert 400 < (per_sample.sum(1) == 0).sum() < 600


@pytest.mark.deadline(120)
@pytest.mark.parametrize(
    ("p", "q", "channels", "rate"),
    [
        (0.1, 0.0, 1, 0.1),  # the default: whole conditions only, the rate is p
        (0.1, 0.0, 3, 0.1),
        (0.1, 0.19, 1, 0.271),  # the authors' trainer + model for one mask
        (0.1, 0.1, 3, 0.1009),  # the authors' model alone, three channels
        (0.3, 0.5, 2, 0.475),
    ],
)
def test_unconditional_rate_is_the_documented_one(tiny_dit, p, q, channels, rate):
    tgca = TGCA3D(tiny_dit, condition_channels=channels, condition_dropout_prob=p, channel_dropout_prob=q)
    assert tgca.unconditional_rate == pytest.approx(rate)
    n = 20_000
    dropped = tgca.drop_condition(torch.ones(n, channels, 2, 2, 2), torch.Generator().manual_seed(0))
    per_channel = dropped.flatten(2).sum(2)  # (n, channels): 8 where kept, 0 where zeroed
    assert set(per_channel.unique().tolist()) <= {0.0, 8.0}  # a channel goes whole or not at all
    unconditional = (per_channel.sum(1) == 0).double().mean().item()
    assert unconditional == pytest.approx(rate, abs=5 * math.sqrt(rate * (1 - rate) / n))
    partial = ((per_channel == 0).any(1) & (per_channel > 0).any(1)).double().mean().item()
    expected_partial = (1 - p) * (1 - q**channels - (1 - q) ** channels)
    assert partial == pytest.approx(expected_partial, abs=5 * math.sqrt(0.25 / n))


def test_channel_dropout_comes_from_the_config():
    cfg = load_config(
        CONFIGS / "tiny" / "dit.yaml",
        CONFIGS / "tiny" / "tgca.yaml",
        overrides=["tgca.params.channel_dropout_prob=0.19"],
    )
    assert build_tgca(cfg).unconditional_rate == pytest.approx(0.271)
    shipped = load_config(CONFIGS / "transformer" / "dit_ds8_xs4.yaml", CONFIGS / "tgca" / "tgca_ds8.yaml")
    with torch.device("meta"):
        assert build_tgca(shipped).unconditional_rate == pytest.approx(0.1)  # as its comment says


def test_precomputed_features_equal_the_condition_path(tiny_dit):
    tgca = randomize(_tgca(tiny_dit), seed=2).eval()
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([5, 100])
    condition = torch.rand(2, 2, 32, 32, 32)
    expected = tgca(x, t, condition)
    assert torch.equal(tgca(x, t, features=tgca.condition_features(condition)), expected)
    assert not torch.allclose(expected, tiny_dit(x, t))  # a trained adapter does change the output
    with pytest.raises(ValueError, match="exactly one"):
        tgca(x, t)
