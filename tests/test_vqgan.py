import pytest
import torch

from tests.conftest import CONFIGS
from voldit.builders import build_vqgan, build_vqgan_discriminator, count_parameters, latent_shape
from voldit.config import load_config
from voldit.models.vqgan import PerceptualUnavailable, VQGANLoss


def test_seed_vqgan_has_reference_parameter_count_and_pinned_defaults():
    cfg = load_config(CONFIGS / "stage1" / "vqgan_ds8.yaml")
    with torch.device("meta"):
        vq = build_vqgan(cfg)
    assert count_parameters(vq)[1] == 95_568_649
    ema = vq.quantizer.quantizer
    assert ema.decay == 0.99 and ema.ddp_sync  # MONAI's defaults would be 0.5 and ddp_sync=True
    assert latent_shape(cfg) == [8, 64, 64, 32]


def test_tiny_vqgan_round_trip_shapes(tiny_vqgan_cfg):
    vq = build_vqgan(tiny_vqgan_cfg).eval()
    x = torch.rand(2, 1, 64, 64, 32) * 2 - 1
    z = vq.encode_stage_2_inputs(x)
    assert list(z.shape[1:]) == latent_shape(tiny_vqgan_cfg)
    assert vq.decode_stage_2_outputs(z).shape == x.shape


def test_generator_and_discriminator_losses(tiny_vqgan_cfg):
    vq, disc = build_vqgan(tiny_vqgan_cfg), build_vqgan_discriminator(tiny_vqgan_cfg)
    loss = VQGANLoss(perceptual_weight=0.0, adv_weight=0.5, jukebox_weight=0.1)
    x = torch.rand(2, 1, 64, 64, 32) * 2 - 1
    recon, q = vq(x)
    total, parts = loss.generator(x, recon, q, disc, adversarial_on=True)
    expected = parts["l1"] + parts["quantization"] + 0.1 * parts["spectral"] + 0.5 * parts["g_adv"]
    torch.testing.assert_close(total, expected)
    assert "g_adv" not in loss.generator(x, recon, q, disc, adversarial_on=False)[1]  # warm-up
    d = loss.discriminator(disc, x, recon)
    assert d.ndim == 0 and d > 0
    d.backward()
    assert all(p.grad is None for p in vq.parameters())  # the generator gets no gradient from the D step


def test_perceptual_loss_offline_fails_with_a_fix():
    with pytest.raises(PerceptualUnavailable, match="set stage1.perceptual_weight: 0"):
        VQGANLoss(perceptual_weight=0.005, perceptual_params={"spatial_dims": 3, "network_type": "squeeze"})


def test_codebook_starts_on_the_data(tiny_vqgan_cfg):
    from voldit.models.vqgan import init_codebook

    torch.manual_seed(0)
    vq = build_vqgan(tiny_vqgan_cfg)
    x = torch.rand(2, 1, 64, 64, 32) * 2 - 1
    assert vq.index_quantize(x).unique().numel() <= 2  # a fresh codebook: everything in one or two codes
    init_codebook(vq, x, torch.Generator().manual_seed(0))
    q = vq.quantizer.quantizer
    assert torch.equal(q.embedding.weight, q.ema_w) and q.ema_cluster_size.eq(1).all()
    assert vq.index_quantize(x).unique().numel() > 50
