"""Samplers, the Denoiser and get_sigmas: against diffusers' schedulers, closed-form Gaussians and each other."""

import inspect
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldm_cli.errors import ConfigError
from ldm_cli.sampling.denoiser import Denoiser, get_sigmas, get_timesteps
from ldm_cli.sampling.samplers import (
    SAMPLERS,
    get_ancestral_step,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STOCHASTIC = {
    "euler_ancestral": {}, "dpmpp_2m_sde": {}, "ddim": {"eta": 1.0}, "ddpm": {}, "dpmpp_sde": {}, "dpmpp_3m_sde": {}
}


def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed smooth 'network' of (x_t, t); the t term makes any timestep mismatch visible."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.5 * torch.tanh(x) + 0.3 * torch.sin(t / 150 + x)


def run_diffusers(scheduler, x: torch.Tensor, steps: int, generator=None, **step_options) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    if "generator" in inspect.signature(scheduler.step).parameters:  # the deterministic ones take none
        step_options["generator"] = generator
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x, **step_options).prev_sample
    return x


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# diffusers settings under which both sides walk the same timesteps and end at σ = 0
DDIM_LIKE_OURS = dict(set_alpha_to_one=True, clip_sample=False, steps_offset=1)
DPMPP_2M = dict(solver_order=2, final_sigmas_type="zero")
VP_SCHEDULERS = (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler)  # their x is x_t, not x_0 + σ ε

# our sampler, its options, the diffusers scheduler and its settings, prediction type, our sigma spacing
DIFFUSERS_CASES = [
    pytest.param("ddim", {}, DDIMScheduler, DDIM_LIKE_OURS, "epsilon", "leading", id="ddim-epsilon"),
    pytest.param("ddim", {}, DDIMScheduler, DDIM_LIKE_OURS, "v_prediction", "leading", id="ddim-v"),
    pytest.param("ddim", {"eta": 1.0}, DDIMScheduler, DDIM_LIKE_OURS, "epsilon", "leading", id="ddim-eta1"),
    pytest.param(
        "ddpm", {}, DDPMScheduler, dict(clip_sample=False, steps_offset=1), "v_prediction", "leading", id="ddpm-v"
    ),
    pytest.param("euler", {}, EulerDiscreteScheduler, dict(steps_offset=1), "v_prediction", "leading", id="euler-v"),
    pytest.param(
        "euler", {}, EulerDiscreteScheduler, dict(use_karras_sigmas=True), "epsilon", "karras", id="euler-karras"
    ),
    pytest.param(
        "euler_ancestral", {}, EulerAncestralDiscreteScheduler, dict(steps_offset=1), "epsilon", "leading",
        id="euler_ancestral",
    ),
    pytest.param(
        "dpmpp_2m", {}, DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", **DPMPP_2M), "epsilon",
        "trailing", id="dpmpp_2m-epsilon",
    ),
    pytest.param(
        "dpmpp_2m", {}, DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", **DPMPP_2M), "v_prediction",
        "trailing", id="dpmpp_2m-v",
    ),
    pytest.param(
        "dpmpp_2m_sde", {}, DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", **DPMPP_2M),
        "v_prediction", "trailing", id="dpmpp_2m_sde",
    ),
    pytest.param(
        "dpmpp_3m_sde", {}, DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", solver_order=3, final_sigmas_type="zero"), "epsilon", "trailing",
        id="dpmpp_3m_sde",
    ),
    pytest.param("unipc", {}, UniPCMultistepScheduler, {}, "epsilon", "trailing", id="unipc-epsilon"),
    pytest.param("unipc", {}, UniPCMultistepScheduler, {}, "v_prediction", "trailing", id="unipc-v"),
    pytest.param(
        "unipc", {"order": 3}, UniPCMultistepScheduler, dict(solver_order=3), "epsilon", "trailing", id="unipc-order3"
    ),
    pytest.param(
        "unipc", {}, UniPCMultistepScheduler, dict(use_karras_sigmas=True), "v_prediction", "karras", id="unipc-karras"
    ),
    pytest.param("lms", {}, LMSDiscreteScheduler, dict(steps_offset=1), "epsilon", "leading", id="lms-epsilon"),
    pytest.param("lms", {}, LMSDiscreteScheduler, dict(use_karras_sigmas=True), "v_prediction", "karras", id="lms-karras"),
    pytest.param(
        "euler", {}, EulerDiscreteScheduler, dict(use_exponential_sigmas=True), "epsilon", "exponential",
        id="euler-exponential",
    ),
]


@pytest.mark.parametrize(
    ("name", "options", "scheduler_class", "scheduler_options", "prediction_type", "spacing"), DIFFUSERS_CASES
)
def test_sampler_matches_diffusers(name, options, scheduler_class, scheduler_options, prediction_type, spacing):
    scheduler = scheduler_class(
        **SD_BETAS,
        prediction_type=prediction_type,
        # karras / exponential: between the schedule's ends
        timestep_spacing="linspace" if spacing in ("karras", "exponential") else spacing,
        **scheduler_options,
    )
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    step_options = {} if scheduler_class in (UniPCMultistepScheduler, LMSDiscreteScheduler) else options
    expected = run_diffusers(scheduler, x, 10, generator=torch.Generator().manual_seed(5), **step_options)
    if scheduler_class not in VP_SCHEDULERS:
        x = x * scheduler.init_noise_sigma

    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    sigmas = get_sigmas(schedule, 10, spacing)
    # VP schedulers start from x_T = ε, which is x = ε · sqrt(σ_T² + 1) in the VE view the samplers use
    x_start = x * math.sqrt(sigmas[0].item() ** 2 + 1) if scheduler_class in VP_SCHEDULERS else x
    # diffusers' UniPC rounds the timesteps of off-grid (karras) σ's for the network
    denoiser = Denoiser(model_fn, schedule, quantize=scheduler_class is UniPCMultistepScheduler and spacing == "karras")
    actual = SAMPLERS[name](denoiser, x_start, sigmas, generator=torch.Generator().manual_seed(5), **options)
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_sde_matches_diffusers_given_the_same_noise(prediction_type):
    from diffusers import DPMSolverSDEScheduler  # needs torchsde

    scheduler = DPMSolverSDEScheduler(**SD_BETAS, prediction_type=prediction_type, use_karras_sigmas=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(10)
    # diffusers draws its noise from a Brownian tree; handing it our stream compares the arithmetic
    diffusers_generator = torch.Generator().manual_seed(5)
    scheduler.noise_sampler = lambda sigma, sigma_next: torch.randn(x.shape, generator=diffusers_generator)
    expected = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        expected = scheduler.step(model_fn(scheduler.scale_model_input(expected, t), t), t, expected).prev_sample

    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    sigmas = get_sigmas(schedule, 10, "karras")
    actual = SAMPLERS["dpmpp_sde"](
        Denoiser(model_fn, schedule), x * sigmas[0], sigmas, generator=torch.Generator().manual_seed(5)
    )
    assert relative_error(actual, expected) < 1e-5


def test_zero_terminal_snr_ddim_matches_diffusers():
    scheduler = DDIMScheduler(
        **SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        set_alpha_to_one=True, clip_sample=False,
    )
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = run_diffusers(scheduler, x, 10)
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    sigmas = get_sigmas(schedule, 10, "trailing")
    actual = sample_ddim(Denoiser(model_fn, schedule), x * math.sqrt(sigmas[0].item() ** 2 + 1), sigmas)
    # diffusers starts at ᾱ_T = 0 exactly, we at a finite σ_T ≈ 4500: a difference of order 1/σ_T
    assert relative_error(actual, expected) < 1e-3


def test_model_sees_the_integer_training_timesteps():
    schedule = NoiseSchedule(ScheduleConfig())
    seen = []

    def recording_model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sigmas = get_sigmas(schedule, 10, "leading")
    sample_euler(Denoiser(recording_model, schedule), torch.ones(3, 1, 2, 2), sigmas)
    expected = get_timesteps(schedule, 10, "leading").float()
    assert torch.equal(torch.stack(seen), expected[:, None].expand(10, 3))  # exact, not approximately


# ---- the Denoiser ----


def test_sigma_to_t_is_exact_on_the_grid_and_inverts_t_to_sigma():
    schedule = NoiseSchedule(ScheduleConfig())
    denoiser = Denoiser(model_fn, schedule)
    assert torch.equal(denoiser.sigma_to_t(schedule.sigmas), torch.arange(1000, dtype=torch.float32))
    t = torch.rand(100, generator=torch.Generator().manual_seed(0)) * 999
    torch.testing.assert_close(denoiser.sigma_to_t(denoiser.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    # outside the table: clamped, no NaN at σ = 0
    out_of_range = denoiser.sigma_to_t(torch.tensor([0.0, 1e-4, 100.0]))
    assert out_of_range.tolist() == [0.0, 0.0, 999.0]
    quantized = Denoiser(model_fn, schedule, quantize=True).sigma_to_t(denoiser.t_to_sigma(torch.tensor([10.4, 10.6])))
    assert quantized.tolist() == [10.0, 11.0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_with_an_oracle_network_returns_x0(prediction_type):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    sigma = torch.tensor([0.1, 1.3, 9.0])  # off the grid, one per sample
    sigma_b = sigma.reshape(-1, 1, 1, 1)
    alpha, sigma_vp = (sigma_b**2 + 1).rsqrt(), sigma_b * (sigma_b**2 + 1).rsqrt()

    def oracle(x_t, t, *, context):
        assert context == "cond" and t.shape == (3,)
        torch.testing.assert_close(x_t, alpha * x0 + sigma_vp * noise)  # c_in puts x on the VP scale
        return {"epsilon": noise, "v_prediction": alpha * noise - sigma_vp * x0, "sample": x0}[prediction_type]

    denoised = Denoiser(oracle, schedule)(x0 + sigma_b * noise, sigma, context="cond")
    torch.testing.assert_close(denoised, x0, atol=1e-5, rtol=1e-5)


# ---- get_sigmas / get_timesteps ----


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 30, 50, 999])
def test_timesteps_match_diffusers(spacing, steps):
    scheduler = DDIMScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule(ScheduleConfig())
    assert torch.equal(get_timesteps(schedule, steps, spacing), scheduler.timesteps)


def test_karras_sigmas_endpoints_and_diffusers():
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = get_sigmas(schedule, 12, "karras")
    assert sigmas[0].item() == pytest.approx(schedule.sigmas[-1].item(), rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(schedule.sigmas[0].item(), rel=1e-6)
    assert sigmas[-1].item() == 0.0
    # ρ = 7 spacing: σ^(1/ρ) is evenly spaced
    second_difference = sigmas[:-1].double().pow(1 / 7).diff().diff()
    assert second_difference.abs().max().item() < 1e-6
    scheduler = EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True, timestep_spacing="linspace")
    scheduler.set_timesteps(12)
    torch.testing.assert_close(sigmas, scheduler.sigmas)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras", "exponential"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_get_sigmas_length_order_and_end(spacing, steps):
    sigmas = get_sigmas(NoiseSchedule(ScheduleConfig()), steps, spacing)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert (sigmas.diff() < 0).all() and sigmas[-1].item() == 0.0


def test_grid_sigmas_are_the_schedule_sigmas_at_the_timesteps():
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = get_sigmas(schedule, 20, "leading")
    assert torch.equal(sigmas[:-1], schedule.sigmas[get_timesteps(schedule, 20, "leading")])
    assert get_timesteps(schedule, 20, "leading")[[0, -1]].tolist() == [951, 1]  # SD: 951 … 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: get_sigmas(s, 10, "cosine"), "spacing"),
        (lambda s: get_sigmas(s, 0, "leading"), "steps"),
        (lambda s: get_sigmas(s, 0, "karras"), "steps"),
        (lambda s: get_sigmas(s, 1001, "trailing"), "steps"),
        (lambda s: get_timesteps(s, 10, "karras"), "spacing"),
        (lambda s: get_timesteps(s, 10, "leading", steps_offset=100), "steps_offset"),
    ],
)
def test_bad_sigma_requests_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call(NoiseSchedule(ScheduleConfig()))


# ---- a Gaussian data distribution N(mu, std²): exact denoiser and exact ODE solution ----

MU, STD = 0.7, 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x_0 | x] for x_0 ~ N(MU, STD²) and x = x_0 + σ ε."""
    return MU + STD**2 / (STD**2 + sigma**2) * (x - MU)


def exact_ode_solution(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The probability-flow ODE keeps (x − MU)/sqrt(STD² + σ²) constant along a trajectory."""
    return MU + (x - MU) * math.sqrt((STD**2 + sigma_to**2) / (STD**2 + sigma_from**2))


@pytest.mark.parametrize(
    ("name", "options", "order"),
    [
        ("euler", {}, 1),
        ("ddim", {"eta": 0.0}, 1),
        ("heun", {}, 2),
        ("dpmpp_2m", {}, 2),
        ("dpmpp_2m_sde", {"eta": 0.0}, 2),
        ("unipc", {}, 2),
        ("unipc", {"order": 3}, 3),
        ("lms", {}, 4),
        ("dpmpp_sde", {"eta": 0.0}, 2),
    ],
)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name, options, order):
    schedule = NoiseSchedule(ScheduleConfig())
    noise = torch.randn(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (10, 20, 40, 80):
        # stop at σ_min: the jump σ_min → 0 is the same first-order step for every step count
        sigmas = get_sigmas(schedule, steps, "karras").double()[:-1]
        x = noise * sigmas[0]
        out = SAMPLERS[name](gaussian_denoiser, x, sigmas, **options)
        errors.append((out - exact_ode_solution(x, sigmas[0].item(), sigmas[-1].item())).abs().max().item())
    assert all(coarse > fine for coarse, fine in zip(errors, errors[1:])), errors
    # halving the step size divides the error by ~2^order
    assert errors[-2] / errors[-1] > (1.8 if order == 1 else 3.5), errors
    assert errors[-1] < (0.05 if order == 1 else 2e-3), errors


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_samplers_reproduce_the_data_distribution(name):
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = get_sigmas(schedule, 200, "karras").double()
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = MU + noise * math.sqrt(STD**2 + sigmas[0].item() ** 2)  # exact marginal at σ_max
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1), **STOCHASTIC[name])
    assert out.mean().item() == pytest.approx(MU, abs=0.015)
    assert out.std().item() == pytest.approx(STD, abs=0.025)
    # fresh noise on the way: unlike the ODE, the result forgets the starting noise
    assert abs(torch.corrcoef(torch.stack([out, noise]))[0, 1].item()) < 0.5


# ---- how samplers relate, reproducibility, progress and img2img ----


def test_ddim_is_euler_at_eta_0_euler_ancestral_at_any_eta_and_ddpm_at_eta_1():
    schedule = NoiseSchedule(ScheduleConfig())
    denoiser = Denoiser(model_fn, schedule)
    sigmas = get_sigmas(schedule, 8, "leading")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    torch.testing.assert_close(sample_ddim(denoiser, x, sigmas), sample_euler(denoiser, x, sigmas))
    for eta in (0.5, 1.0):
        ddim = sample_ddim(denoiser, x, sigmas, eta=eta, generator=torch.Generator().manual_seed(3))
        ancestral = sample_euler_ancestral(denoiser, x, sigmas, eta=eta, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ddim, ancestral)
    ddpm = sample_ddpm(denoiser, x, sigmas, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ddpm, ancestral, atol=1e-4, rtol=1e-4)
    sde_at_eta_0 = sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=0.0)
    torch.testing.assert_close(sde_at_eta_0, sample_dpmpp_2m(denoiser, x, sigmas), atol=1e-4, rtol=1e-4)


def test_ancestral_step_keeps_the_noise_level():
    sigma_down, sigma_up = get_ancestral_step(3.0, 2.0, eta=0.7)
    assert sigma_down**2 + sigma_up**2 == pytest.approx(4.0)
    assert sigma_up == pytest.approx(0.7 * 2.0 * math.sqrt(1 - 4 / 9))
    assert get_ancestral_step(3.0, 0.0) == (0.0, 0.0) and get_ancestral_step(3.0, 2.0, eta=0.0) == (2.0, 0.0)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_seeded_generator_makes_sampling_reproducible(name):
    schedule = NoiseSchedule(ScheduleConfig())
    denoiser, sigmas = Denoiser(model_fn, schedule), get_sigmas(schedule, 6, "karras")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def run(seed):
        return SAMPLERS[name](denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), **STOCHASTIC[name])

    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_one_generator_per_image_makes_a_batch_equal_its_images_alone(name):
    schedule = NoiseSchedule(ScheduleConfig())
    denoiser, sigmas = Denoiser(model_fn, schedule), get_sigmas(schedule, 6, "karras")
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    seeds = (5, 6, 7)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    batch = SAMPLERS[name](denoiser, x, sigmas, generator=generators(), **STOCHASTIC[name])
    for i, generator in enumerate(generators()):  # model_fn is row-wise, so equality is exact
        alone = SAMPLERS[name](denoiser, x[i : i + 1], sigmas, generator=generator, **STOCHASTIC[name])
        assert torch.equal(batch[i : i + 1], alone)
    # one generator shared by the batch draws other noise: the per-image streams make the rows equal
    shared = SAMPLERS[name](denoiser, x, sigmas, generator=torch.Generator().manual_seed(5), **STOCHASTIC[name])
    assert not torch.allclose(shared[1], batch[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        SAMPLERS[name](denoiser, x, sigmas, generator=generators()[:2], **STOCHASTIC[name])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_reports_each_step_and_sigmas_may_start_midway(name):
    schedule = NoiseSchedule(ScheduleConfig())
    sigmas = get_sigmas(schedule, 40, "karras").double()
    start = 25  # img2img: noise a clean x_0 to sigmas[start] and walk the rest
    generator = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(512, generator=generator, dtype=torch.float64)
    x = x0 + torch.randn(512, generator=generator, dtype=torch.float64) * sigmas[start]
    progress = []
    out = SAMPLERS[name](
        gaussian_denoiser, x, sigmas[start:], generator=generator, callback=lambda i, total: progress.append((i, total))
    )
    assert progress == [(i, 15) for i in range(1, 16)]
    # a light noise level keeps the picture: the result stays near the input (σ_start ≈ 0.4 < STD)
    assert (out - x0).abs().mean().item() < sigmas[start].item()


def test_sample_by_name_validates_the_name_and_options():
    schedule = NoiseSchedule(ScheduleConfig())
    denoiser, sigmas = Denoiser(model_fn, schedule), get_sigmas(schedule, 4, "leading")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    torch.testing.assert_close(
        sample("ddim", denoiser, x, sigmas, eta=0.0), sample_ddim(denoiser, x, sigmas.tolist())  # a list works too
    )
    with pytest.raises(ConfigError, match="unknown sampler 'plms'"):
        sample("plms", denoiser, x, sigmas)
    with pytest.raises(ConfigError, match="no option eta"):
        sample("euler", denoiser, x, sigmas, eta=0.5)


def test_the_registry_says_which_samplers_add_noise_and_which_options_they_take():
    x, sigmas = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([5.0, 2.0, 0.5, 0.0])

    def shrink(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.5 * x

    for name, sampler in SAMPLERS.items():
        for options in ([{}, {"eta": 0.0}, {"eta": 0.7}] if "eta" in sampler.options else [{}]):
            first, second = (sampler(shrink, x, sigmas, generator=torch.Generator().manual_seed(seed), **options) for seed in (1, 2))
            assert (not torch.equal(first, second)) == sampler.is_stochastic(options), (name, options)
