"""NoiseSchedule against diffusers' DDPMScheduler and closed forms; ScheduleConfig validation and YAMLs."""

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf

import ldm_cli
from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldm_cli.errors import ConfigError

DIFFUSERS_BETA_SCHEDULE = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
SCHEDULE_YAMLS = Path(ldm_cli.__file__).parent / "configs" / "schedule"


def diffusers_scheduler(config: ScheduleConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=DIFFUSERS_BETA_SCHEDULE[config.beta_schedule],
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr,
    )


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_alphas_cumprod_match_diffusers(beta_schedule, rescale):
    config = ScheduleConfig(
        beta_schedule=beta_schedule,
        beta_start=0.0001 if beta_schedule == "linear" else 0.00085,
        beta_end=0.02 if beta_schedule == "linear" else 0.012,
        prediction_type="v_prediction" if rescale else "epsilon",
        rescale_betas_zero_snr=rescale,
    )
    schedule, reference = NoiseSchedule(config), diffusers_scheduler(config)
    torch.testing.assert_close(schedule.betas, reference.betas)
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod)
    assert (schedule.alphas_cumprod[-1] == 0) == rescale  # zero terminal SNR exactly
    assert torch.isfinite(schedule.sigmas).all() and (schedule.sigmas.diff() > 0).all()


def test_sigmas_are_k_diffusion_sigmas():
    schedule = NoiseSchedule(ScheduleConfig())
    alphas_cumprod = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.sigmas, ((1 - alphas_cumprod) / alphas_cumprod).sqrt())
    # SD v1 values every sampler user knows
    assert schedule.sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert schedule.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_zero_snr_sigma_max_is_finite():
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    assert schedule.sigmas[-1].item() == pytest.approx(schedule.sigmas[-2].item() ** 2 / schedule.sigmas[-3].item())
    assert 4000 < schedule.sigmas[-1].item() < 5000
    assert schedule.snr(torch.tensor([999])).item() == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_add_noise_and_target_match_diffusers(prediction_type):
    config = ScheduleConfig(prediction_type=prediction_type)
    schedule, reference = NoiseSchedule(config), diffusers_scheduler(config)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    expected_target = {"epsilon": noise, "sample": x0, "v_prediction": reference.get_velocity(x0, noise, t)}
    torch.testing.assert_close(schedule.target(x0, noise, t), expected_target[prediction_type])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_and_eps_invert_the_forward_process(prediction_type):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 4, 4, generator=generator)
    noise = torch.randn(3, 4, 4, 4, generator=generator)
    t = torch.tensor([10, 400, 900])
    x_t = schedule.add_noise(x0, noise, t)
    perfect_output = schedule.target(x0, noise, t)
    torch.testing.assert_close(schedule.predict_x0(x_t, perfect_output, t), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.predict_eps(x_t, perfect_output, t), noise, atol=2e-4, rtol=1e-4)


def test_snr_closed_form_and_dtype_follows_input():
    schedule = NoiseSchedule(ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02))
    t = torch.tensor([0, 999])
    alphas_cumprod = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64), 0)[t]
    torch.testing.assert_close(schedule.snr(t).double(), alphas_cumprod / (1 - alphas_cumprod), rtol=1e-3, atol=0)
    x0 = torch.zeros(2, 3, 2, 2, dtype=torch.bfloat16)
    assert schedule.add_noise(x0, torch.ones_like(x0), t).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "x0"}, "prediction_type"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"rescale_betas_zero_snr": True}, "v_prediction"),
    ],
)
def test_invalid_config_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(**overrides)


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "cosine"])
def test_schedule_yamls_are_flat_schedule_configs(name):
    text = (SCHEDULE_YAMLS / f"{name}.yaml").read_text()
    assert text.startswith("# ")
    loaded = OmegaConf.load(SCHEDULE_YAMLS / f"{name}.yaml")
    assert set(loaded.keys()) == {field.name for field in fields(ScheduleConfig)}
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScheduleConfig), loaded))
    assert isinstance(config, ScheduleConfig) and config.beta_schedule == name
    NoiseSchedule(config)


def test_scaled_linear_yaml_is_stable_diffusion_v1():
    config = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ScheduleConfig), OmegaConf.load(SCHEDULE_YAMLS / "scaled_linear.yaml"))
    )
    assert config == ScheduleConfig(1000, "scaled_linear", 0.00085, 0.012, "epsilon", False)
