import pytest
import torch

from tests.conftest import CONFIGS, randomize
from voldit.builders import build_dit, count_parameters
from voldit.config import load_config
from voldit.models.dit import DIT_MODELS, DiT3D, sincos_3d

# Trainable parameters of the reference implementation (DESIGN.md).
REFERENCE_PARAMS = {
    "xs2": 16_551_616,
    "xs4": 16_896_128,
    "s2": 32_511_424,
    "s4": 32_855_936,
    "b2": 129_608_512,
    "b4": 130_297_088,
    "l2": 578_153_152,
    "l4": 579_185_792,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_seed_configs_match_reference_parameter_counts(name):
    cfg = load_config(CONFIGS / "transformer" / f"dit_ds8_{name}.yaml")
    with torch.device("meta"):
        model = build_dit(cfg)
    assert count_parameters(model)[0] == REFERENCE_PARAMS[name]
    assert model.num_tokens == 64 * 64 * 32 // cfg.dit.params.patch_size**3
    # The authors' trained recipe: dropout after the projection and in the MLP, none on attention weights.
    for block in model.blocks:
        assert (block.attn.attn_drop, block.attn.proj_drop.p, block.mlp.drop.p) == (0.0, 0.1, 0.1)


def test_presets_cover_the_eight_configs():
    assert sorted(DIT_MODELS) == sorted(f"VolDiT-{s}/{p}" for s in ("XS", "S", "B", "L") for p in (2, 4))


def test_zero_initialised_output_and_shape(tiny_dit):
    model = DiT3D(input_size=(4, 4, 4), patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4)
    x = torch.randn(3, 4, 4, 4, 4)
    out = model(x, torch.tensor([0, 10, 299]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # AdaLN-Zero: the untrained model predicts zero
    assert tiny_dit(x, torch.tensor([0, 10, 299])).abs().sum() > 0


def test_unpatchify_inverts_patch_layout(tiny_dit):
    # Route each voxel through the patch layout by hand and back through unpatchify.
    x = torch.arange(2 * 4 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4, 4)
    p = 2
    b, c, d, h, w = x.shape
    tokens = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    tokens = tokens.reshape(b, (d // p) * (h // p) * (w // p), p**3 * c)
    assert torch.equal(tiny_dit.unpatchify(tokens), x)


def test_position_table_is_distinct_per_token_and_bounded():
    table = sincos_3d(48, (4, 4, 2))
    assert table.shape == (32, 48)
    assert table.abs().max() <= 1.0
    assert torch.cdist(table, table).add(torch.eye(32)).min() > 0.1  # no two tokens share a position


def test_rejects_inputs_of_the_wrong_size(tiny_dit):
    with pytest.raises(ValueError, match="expected latents"):
        tiny_dit(torch.randn(1, 4, 8, 8, 8), torch.tensor([1]))


def test_constructor_validates_divisibility():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT3D(input_size=(6, 6, 6), patch_size=4, hidden_size=32, num_heads=4, depth=1)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiT3D(input_size=(4, 4, 4), patch_size=2, hidden_size=30, num_heads=4, depth=1)


def test_compiled_dit_matches_eager(tiny_dit):
    """The `training.compile` fast path: torch.compile gives the same prediction (float32, CPU)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, 4, generator=g), torch.tensor([3, 250])
    compiled = torch.compile(tiny_dit)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), tiny_dit(x, t), rtol=1e-4, atol=1e-5)


def test_block_compilation_matches_eager_and_keeps_parameter_names(tiny_dit):
    """`compile_blocks` (what `training.compile` does): same prediction, same state-dict keys."""
    import copy

    from voldit.models.dit import compile_blocks

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, 4, generator=g), torch.tensor([3, 250])
    for p in tiny_dit.parameters():  # AdaLN-Zero outputs zero at init: give the blocks work to do
        p.data.normal_(0, 0.05, generator=g)
    compiled = compile_blocks(copy.deepcopy(tiny_dit))
    assert list(compiled.state_dict()) == list(tiny_dit.state_dict())
    with torch.no_grad():
        want = tiny_dit(x, t)
        assert want.abs().mean() > 1e-3
        torch.testing.assert_close(compiled(x, t), want, rtol=1e-4, atol=1e-5)


def test_compiled_blocks_drop_what_eager_blocks_drop():
    """In training mode (the reference's dropout 0.1) blocks compiled with ATen's RNG reproduce the eager
    model from the same seed, forward and gradients; Inductor's own RNG draws other masks."""
    import copy

    from voldit.models.dit import compile_blocks

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, 4, generator=g), torch.tensor([3, 250])
    model = DiT3D(input_size=(4, 4, 4), patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4)
    model = randomize(model).train()

    def run(model):
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        out = model(x, t)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_grads = run(model)
    torch.manual_seed(8)
    assert not torch.allclose(model(x, t), want)  # dropout is on: another seed, another output
    got, got_grads = run(compile_blocks(copy.deepcopy(model), eager_rng=True))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):  # another mask would differ by far more
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    other, _ = run(compile_blocks(copy.deepcopy(model), eager_rng=False))
    assert not torch.allclose(other, want)


def test_attention_dropout_key_reaches_every_attention_module():
    cfg = load_config(
        CONFIGS / "tiny" / "dit.yaml",
        overrides=["dit.params.attention_dropout=0.3", "dit.params.dropout=0.2"],
    )
    model = build_dit(cfg)
    assert [b.attn.attn_drop for b in model.blocks] == [0.3] * cfg.dit.params.depth
    assert [b.attn.proj_drop.p for b in model.blocks] == [0.2] * cfg.dit.params.depth
    assert [b.mlp.drop.p for b in model.blocks] == [0.2] * cfg.dit.params.depth


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_attention_dropout_alone_changes_a_training_forward_pass(attention):
    """With every other dropout off, a training-mode pass equals the eval-mode pass exactly when
    attention_dropout is 0, and differs when it is not."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4, 4, generator=g), torch.tensor([3, 250])
    dims = dict(input_size=(4, 4, 4), patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4)
    for attention_dropout, equal in ((0.0, True), (0.3, False)):
        torch.manual_seed(0)
        model = randomize(
            DiT3D(**dims, dropout=0.0, attention=attention, attention_dropout=attention_dropout)
        )
        with torch.no_grad():
            want = model.eval()(x, t)
            got = model.train()(x, t)
        assert torch.equal(got, want) is equal
