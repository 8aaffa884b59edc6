import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.networks.schedulers.scheduler import NoiseSchedules

from voldit.diffusion import NoiseSchedule, classifier_free, diffusion_loss, sample
from voldit.diffusion.schedule import _cosine_betas
from voldit.precision import autocast, resolve

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
GOLDEN = {
    ("ddpm", 300): (-31.0163, 1.0206),
    ("ddim", 20): (19.3111, -1.4297),
    ("dpmpp", 20): (20.9847, -1.5082),
}


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


def test_log_snr_timesteps():
    s = NoiseSchedule(300)
    for steps in (1, 2, 10, 25, 100, 300):
        ts = s.log_snr_timesteps(steps)
        assert len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[-1] == 0
        assert ts[0] == s.inference_timesteps(steps)[0]  # the same start as DDPM and DDIM
    assert s.log_snr_timesteps(300) == list(range(299, -1, -1))
    # Between the first timestep and the consecutive ones near t = 0, the log-SNR steps are near equal.
    ts = s.log_snr_timesteps(10)
    h = [float(s.half_log_snr[b] - s.half_log_snr[a]) for a, b in zip(ts, ts[1:], strict=False)]
    assert max(h[:-2]) / min(h[:-2]) < 1.2, h


def _lambda(s, t):
    abar = s.alphas_cumprod[t].item()
    return math.log(math.sqrt(abar) / math.sqrt(1 - abar))


def test_dpmpp_matches_a_step_computed_by_hand():
    """Three steps: first order from the noise, second order (multistep) with the first step's x0, and the
    last one to the data prediction; each written out from Lu et al. (2022), Algorithm 2 (DPM-Solver++(2M))."""
    s = NoiseSchedule(300)

    def denoise(x, t):  # a v-prediction that depends on x and, non-linearly, on t
        return 0.3 * x + torch.sin(t.double() / 50).view(-1, 1, 1, 1, 1)

    shape = (2, 3, 2, 2, 2)
    got = sample(denoise, s, shape, torch.Generator().manual_seed(5), "dpmpp", steps=3, dtype=torch.float64)

    t0, t1, t2 = s.log_snr_timesteps(3)
    alpha = {t: math.sqrt(s.alphas_cumprod[t].item()) for t in (t0, t1, t2)}
    sigma = {t: math.sqrt(1 - s.alphas_cumprod[t].item()) for t in (t0, t1, t2)}

    def x0_of(x, t):  # v-prediction: x0 = alpha x - sigma v
        return alpha[t] * x - sigma[t] * denoise(x, torch.full((shape[0],), t))

    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).double()
    d0 = x0_of(x, t0)
    h1 = _lambda(s, t1) - _lambda(s, t0)
    x = sigma[t1] / sigma[t0] * x - alpha[t1] * (math.exp(-h1) - 1) * d0  # first order
    d1 = x0_of(x, t1)
    h2 = _lambda(s, t2) - _lambda(s, t1)
    r = h1 / h2
    d = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    x = sigma[t2] / sigma[t1] * x - alpha[t2] * (math.exp(-h2) - 1) * d  # second order
    want = x0_of(x, t2)  # to t = -1: the data prediction
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    first_order_only = sigma[t2] / sigma[t1] * x - alpha[t2] * (math.exp(-h2) - 1) * d1
    assert not torch.allclose(x, first_order_only)  # the second-order term matters in this example


class _GaussianData:
    """Data x0 ~ N(mu, std^2) per channel, and its exact v-prediction: the posterior mean
    E[x0 | x_t] = mu + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mu) turned into v. Channels
    range from sharp (std 0.05, nearly a point mass) to wide (std 2)."""

    def __init__(self, schedule):
        self.s = schedule
        self.mu = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
        self.std = torch.tensor([0.05, 0.5, 1.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1, 1)

    def _coefficients(self, t):
        abar = self.s.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def posterior_mean(self, x, alpha, sigma):
        gain = alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2)
        return self.mu + gain * (x - alpha * self.mu)

    def __call__(self, x, t):
        alpha, sigma = self._coefficients(t)
        x0 = self.posterior_mean(x, alpha, sigma)
        return alpha * (x - alpha * x0) / sigma - sigma * x0  # v = alpha eps - sigma x0

    def exact(self, noise, t_start):
        """The sampler's output without discretisation error: the probability-flow ODE from ``noise`` at
        t_start to t = 0 (it keeps each value's standardised position in the Gaussian marginal), then the
        data prediction there."""
        a1, s1 = self._coefficients(torch.tensor([t_start]))
        a0, s0 = self._coefficients(torch.tensor([0]))
        z = (noise - a1 * self.mu) / (a1**2 * self.std**2 + s1**2).sqrt()
        x_0 = a0 * self.mu + (a0**2 * self.std**2 + s0**2).sqrt() * z
        return self.posterior_mean(x_0, a0, s0)


def test_dpmpp_converges_on_gaussian_data_and_beats_ddim():
    s = NoiseSchedule(300)
    data = _GaussianData(s)
    shape = (64, 4, 2, 2, 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).double()  # what sample() draws

    def error(sampler, steps):
        """RMS distance to the exact solution, in units of each channel's data std."""
        start = (s.log_snr_timesteps if sampler == "dpmpp" else s.inference_timesteps)(steps)[0]
        got = sample(data, s, shape, torch.Generator().manual_seed(0), sampler, steps, dtype=torch.float64)
        return ((got - data.exact(noise, start)) / data.std).square().mean().sqrt().item()

    dpmpp = {steps: error("dpmpp", steps) for steps in (5, 10, 20)}
    ddim = {steps: error("ddim", steps) for steps in (5, 10, 20)}
    assert dpmpp[5] > dpmpp[10] > dpmpp[20]  # measured 0.066, 0.016, 0.0069
    assert dpmpp[10] < 0.03 and dpmpp[20] < 0.01
    for steps in dpmpp:  # DDIM measured 0.37, 0.28, 0.19: first order, its last step is long
        assert dpmpp[steps] < ddim[steps] / 5


def test_dpmpp_is_deterministic_given_the_generator(tiny_dit):
    s = NoiseSchedule(300)
    run = lambda gen: sample(tiny_dit, s, (2, 4, 4, 4, 4), gen, "dpmpp", steps=10)  # noqa: E731
    first = run(torch.Generator().manual_seed(7))
    assert torch.equal(run(torch.Generator().manual_seed(7)), first)
    assert not torch.allclose(run(torch.Generator().manual_seed(8)), first)
    # One generator per sample: a sample does not depend on its batch-mates.
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]  # noqa: E731
    pair = run(gens([11, 12]))
    alone = sample(tiny_dit, s, (1, 4, 4, 4, 4), gens([12]), "dpmpp", steps=10)
    torch.testing.assert_close(pair[1:], alone, rtol=1e-5, atol=1e-5)


def test_dpmpp_passes_conditions_through_guidance():
    """The sampler is the only thing that changes: the same denoiser with classifier-free guidance and
    conditioning keywords runs under dpmpp as under ddim."""

    def denoise(x, t, condition):
        return 0.1 * x + condition.mean(dim=(1, 2, 3, 4), keepdim=True)

    s, c = NoiseSchedule(300), torch.ones(2, 1, 2, 2, 2)
    guided = classifier_free(denoise, 3.0)
    for sampler in ("ddim", "dpmpp"):
        x = sample(guided, s, (2, 1, 2, 2, 2), torch.Generator().manual_seed(0), sampler, 8, condition=c)
        plain = sample(denoise, s, (2, 1, 2, 2, 2), torch.Generator().manual_seed(0), sampler, 8, condition=c)
        assert torch.isfinite(x).all() and not torch.allclose(x, plain)


def test_eta_belongs_to_ddim():
    s = NoiseSchedule(300)
    with pytest.raises(ValueError, match="eta is DDIM's noise; the dpmpp sampler takes none"):
        sample(lambda x, t: x, s, (1, 1, 2, 2, 2), torch.Generator(), "dpmpp", steps=2, eta=0.5)
    with pytest.raises(ValueError, match="the ddpm sampler takes none"):
        sample(lambda x, t: x, s, (1, 1, 2, 2, 2), torch.Generator(), "ddpm", steps=2, eta=0.5)


def test_precision_modes_map_to_one_autocast():
    """Sampling's auto is bf16 on GPU and full precision on CPU; an explicit mode autocasts anywhere."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve("auto", cuda) == "bf16" and resolve("auto", cpu) == "no" and resolve("fp16", cpu) == "fp16"
    for mode in ("auto", "no"):
        with autocast(mode, cpu):
            assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
