import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.networks.schedulers.scheduler import NoiseSchedules

from voldit.diffusion import NoiseSchedule, classifier_free, diffusion_loss, sample
from voldit.diffusion.schedule import _cosine_betas

if "voldit_cosine" not in NoiseSchedules:
    NoiseSchedules.add_def("voldit_cosine", "the cosine schedule as VolDiT trains it")(
        lambda num_train_timesteps: _cosine_betas(num_train_timesteps)
    )


def test_cosine_schedule_properties():
    s = NoiseSchedule(300)
    abar = s.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (300,)
    assert torch.all(abar[1:] < abar[:-1])
    assert abar[0] > 0.999 and abar[-1] < 1e-4
    assert s.betas.max() == pytest.approx(0.9999)  # clipped as the reference clips


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_prediction_identities(prediction):
    s = NoiseSchedule(300, prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 3, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 3, 5, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 1, 150, 299])
    xt = s.add_noise(x0, eps, t)
    abar = s.alphas_cumprod[t].view(-1, 1, 1)
    torch.testing.assert_close(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    x0_hat, eps_hat = s.split_prediction(s.target(x0, eps, t), xt, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_velocity_definition():
    s = NoiseSchedule(300)
    x0, eps, t = (
        torch.ones(1, 2, dtype=torch.float64),
        torch.full((1, 2), 2.0, dtype=torch.float64),
        torch.tensor([7]),
    )
    a, b = s.alphas_cumprod[7].sqrt(), (1 - s.alphas_cumprod[7]).sqrt()
    torch.testing.assert_close(s.velocity(x0, eps, t), (a * eps - b * x0).expand(1, 2))


def _monai_sample(scheduler, denoise, shape, seed, **step_kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for t in scheduler.timesteps:
        x, _ = scheduler.step(
            denoise(x, torch.full((shape[0],), int(t))), int(t), x, generator=g, **step_kwargs
        )
    return x


def test_ddpm_matches_monai_scheduler(tiny_dit):
    s = NoiseSchedule(300)
    ref = DDPMScheduler(300, schedule="voldit_cosine", prediction_type="v_prediction", clip_sample=False)
    expected = _monai_sample(ref, tiny_dit, (2, 4, 4, 4, 4), seed=3)
    got = sample(tiny_dit, s, (2, 4, 4, 4, 4), torch.Generator().manual_seed(3), "ddpm")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ddim_matches_monai_scheduler(tiny_dit):
    # MONAI 1.6 spaces shortened DDIM schedules by linspace, the reference by multiples of T // steps;
    # at steps == T the two coincide, which checks the update rule itself.
    s = NoiseSchedule(300)
    ref = DDIMScheduler(300, schedule="voldit_cosine", prediction_type="v_prediction", clip_sample=False)
    ref.set_timesteps(300)
    expected = _monai_sample(ref, tiny_dit, (2, 4, 4, 4, 4), seed=4, eta=0.0)
    got = sample(tiny_dit, s, (2, 4, 4, 4, 4), torch.Generator().manual_seed(4), "ddim", steps=300)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_short_schedules_use_the_reference_spacing():
    assert NoiseSchedule(300).inference_timesteps(25) == list(range(288, -1, -12))
    assert NoiseSchedule(300).inference_timesteps(300) == list(range(299, -1, -1))


# Golden numbers: (sum, first voxel) of a sample from the fixture model; they change only if the
# schedule, the sampler, the model or the noise stream changes.
GOLDEN = {("ddpm", 300): (-31.0163, 1.0206), ("ddim", 20): (19.3111, -1.4297)}


@pytest.mark.parametrize(("sampler", "steps"), sorted(GOLDEN))
def test_golden_samples(tiny_dit, sampler, steps):
    x = sample(
        tiny_dit, NoiseSchedule(300), (2, 4, 4, 4, 4), torch.Generator().manual_seed(0), sampler, steps
    )
    total, first = GOLDEN[(sampler, steps)]
    assert x.sum().item() == pytest.approx(total, abs=2e-3)
    assert x[0, 0, 0, 0, 0].item() == pytest.approx(first, abs=2e-4)


def test_per_sample_generators_make_samples_independent_of_batch(tiny_dit):
    s = NoiseSchedule(300)
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]  # noqa: E731
    pair = sample(tiny_dit, s, (2, 4, 4, 4, 4), gens([11, 12]), "ddpm", steps=30)
    alone = sample(tiny_dit, s, (1, 4, 4, 4, 4), gens([12]), "ddpm", steps=30)
    torch.testing.assert_close(pair[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="generators for a batch"):
        sample(tiny_dit, s, (3, 4, 4, 4, 4), gens([1, 2]), "ddpm", steps=2)


def test_classifier_free_guidance():
    def denoise(x, t, condition):
        return x + condition.mean(dim=(1, 2, 3, 4), keepdim=True)

    x, t, c = torch.zeros(2, 1, 2, 2, 2), torch.tensor([1, 1]), torch.ones(2, 1, 2, 2, 2)
    assert classifier_free(denoise, 1.0) is denoise
    guided = classifier_free(denoise, 3.0)
    torch.testing.assert_close(guided(x, t, condition=c), torch.full_like(x, 3.0))  # 0 + 3 * (1 - 0)
    # An unconditional input of batch one is shared by every sample.
    shared = classifier_free(denoise, 3.0, unconditional={"condition": torch.full((1, 1, 2, 2, 2), 0.5)})
    torch.testing.assert_close(shared(x, t, condition=c), torch.full_like(x, 2.0))  # 0.5 + 3 * (1 - 0.5)


def test_loss_is_smooth_l1_to_target(tiny_dit):
    s = NoiseSchedule(300)
    x0 = torch.randn(3, 4, 4, 4, 4)

    def perfect(xt, t):
        # The exact target recovered from x_t, since x0 is known: a perfect denoiser.
        abar = s.alphas_cumprod[t].view(-1, 1, 1, 1, 1).float()
        return s.target(x0, (xt - abar.sqrt() * x0) / (1 - abar).sqrt(), t)

    assert diffusion_loss(perfect, s, x0, torch.Generator().manual_seed(0)).item() < 1e-8
    assert diffusion_loss(tiny_dit, s, x0, torch.Generator().manual_seed(0)).item() > 0.01


def test_invalid_sampler_arguments(tiny_dit):
    s = NoiseSchedule(300)
    with pytest.raises(ValueError, match="sampler must be"):
        sample(tiny_dit, s, (1, 4, 4, 4, 4), torch.Generator(), "euler")
    with pytest.raises(ValueError, match="steps must be"):
        sample(tiny_dit, s, (1, 4, 4, 4, 4), torch.Generator(), "ddim", steps=301)
    with pytest.raises(ValueError, match="schedule must be"):
        NoiseSchedule(300, "quadratic")


def test_schedule_table_is_copied_to_each_device_once():
    """A per-call copy of the table to the GPU would make the host wait for the GPU at every step."""
    schedule = NoiseSchedule(300, "cosine", "v_prediction")
    like = torch.empty(2, 8, 4, 4, 4, device="meta")
    t = torch.tensor([3, 7], device="meta")
    abar = schedule.abar(t, like)
    assert abar.device.type == "meta" and abar.shape == (2, 1, 1, 1, 1) and abar.dtype == like.dtype
    table = schedule._tables[like.device]
    schedule.split_prediction(like, like, t), schedule.add_noise(like, like, t)
    assert schedule._tables[like.device] is table and set(schedule._tables) == {like.device}
    cpu = torch.zeros(2, 3)
    want = schedule.alphas_cumprod[torch.tensor([3, 7])].float().view(2, 1)
    assert torch.equal(schedule.abar(torch.tensor([3, 7]), cpu), want)
