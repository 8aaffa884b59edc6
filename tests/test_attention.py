import pytest
import torch

from voldit.models.attention import Attention, math_attention, resolve_backend, xformers_available


@pytest.mark.parametrize("shape", [(2, 4, 33, 16), (1, 6, 128, 64)])
def test_sdpa_matches_reference_math(shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    expected = math_attention(q, k, v)
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_attention_module_backends_agree():
    torch.manual_seed(0)
    sdpa = Attention(64, 8, backend="sdpa").eval()
    math = Attention(64, 8, backend="math").eval()
    math.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 50, 64)
    torch.testing.assert_close(sdpa(x), math(x), rtol=1e-5, atol=1e-6)


def test_attention_mixes_tokens_not_heads():
    # Changing one token must change other tokens' outputs (attention runs over the token axis).
    torch.manual_seed(0)
    attn = Attention(32, 4).eval()
    x = torch.randn(1, 10, 32)
    y = x.clone()
    y[0, 0] += 1.0
    assert not torch.allclose(attn(x)[0, 5], attn(y)[0, 5])


def test_backend_validation_and_xformers_fallback():
    with pytest.raises(ValueError, match="attention backend"):
        resolve_backend("flash3")
    assert resolve_backend("xformers") == ("xformers" if xformers_available() else "sdpa")


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_pinned_sdpa_kernels_agree_with_math_eager_and_compiled(backend):
    """A pinned kernel runs where it can and falls back where it cannot (the CPU has no cuDNN or
    memory-efficient kernel): either way the same attention, also inside torch.compile."""
    torch.manual_seed(0)
    reference = Attention(64, 8, backend="math").eval()
    pinned = Attention(64, 8, backend=backend).eval()
    pinned.load_state_dict(reference.state_dict())
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        torch.testing.assert_close(pinned(x), reference(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.compile(pinned)(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_projection_dropout_alone_leaves_attention_weights_undropped(backend):
    """attention_dropout 0 beside dropout 0.1 after the projection (the authors' trained recipe): in training
    mode the projection's mask is the only random draw, so the output is the eval-mode output dropped with
    that mask. Dropping the attention weights too (the control) draws a mask first and breaks the equality."""
    torch.manual_seed(0)
    x = torch.randn(2, 50, 64)
    for attn_drop, equal in ((0.0, True), (0.1, False)):
        attn = Attention(64, 8, attn_drop=attn_drop, proj_drop=0.1, backend=backend)
        with torch.no_grad():
            undropped = attn.eval()(x)
            torch.manual_seed(1)
            want = torch.nn.functional.dropout(undropped, p=0.1, training=True)
            torch.manual_seed(1)
            got = attn.train()(x)
        assert torch.equal(got, want) is equal
