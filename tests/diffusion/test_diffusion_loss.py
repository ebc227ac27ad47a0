"""diffusion_loss and sample_noise against closed forms."""

import pytest
import torch

from ldm_cli.diffusion.loss import diffusion_loss, min_snr_weight
from ldm_cli.noise import sample_noise
from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldm_cli.errors import ConfigError


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=generator)
    noise = torch.randn(4, 3, 5, 5, generator=generator)
    model_output = torch.randn(4, 3, 5, 5, generator=generator)
    return x0, noise, model_output, torch.tensor([0, 50, 400, 999])


def test_unweighted_loss_is_plain_mse():
    schedule = NoiseSchedule(ScheduleConfig())
    _, noise, model_output, t = batch()
    loss = diffusion_loss(model_output, noise, t, schedule)
    assert loss.shape == ()
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(model_output, noise))


def test_loss_is_float32_under_bf16_inputs():
    schedule = NoiseSchedule(ScheduleConfig())
    _, noise, model_output, t = batch()
    loss = diffusion_loss(model_output.bfloat16(), noise.bfloat16(), t, schedule, min_snr_gamma=5.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_closed_form(prediction_type):
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    _, noise, model_output, t = batch()
    gamma = 5.0
    snr = schedule.snr(t)
    expected_weight = {
        "epsilon": torch.minimum(snr, torch.tensor(gamma)) / snr,
        "v_prediction": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1),
        "sample": torch.minimum(snr, torch.tensor(gamma)),
    }[prediction_type]
    per_sample = ((model_output - noise) ** 2).mean(dim=(1, 2, 3))
    expected = (expected_weight * per_sample).mean()
    torch.testing.assert_close(diffusion_loss(model_output, noise, t, schedule, min_snr_gamma=gamma), expected)
    if prediction_type == "epsilon":  # high-SNR (small t) samples are down-weighted, low-SNR ones kept
        assert expected_weight[0] == pytest.approx(gamma / snr[0].item()) and expected_weight[-1] == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_loss_equals_clamped_snr_weighted_x0_error(prediction_type):
    # Hang et al. 2023: every target's weighted loss equals min(SNR, γ) · ||x̂_0 − x_0||²
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    x0, noise, model_output, t = batch(1)
    t = torch.tensor([20, 150, 500, 900])
    x_t = schedule.add_noise(x0, noise, t)
    gamma = 5.0
    x0_error = ((schedule.predict_x0(x_t, model_output, t) - x0) ** 2).mean(dim=(1, 2, 3))
    expected = (schedule.snr(t).clamp(max=gamma) * x0_error).mean()
    loss = diffusion_loss(model_output, schedule.target(x0, noise, t), t, schedule, min_snr_gamma=gamma)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)


def test_min_snr_epsilon_weight_is_one_at_zero_snr():
    weight = min_snr_weight(torch.tensor([0.0, 1.0, 100.0]), 5.0, "epsilon")
    torch.testing.assert_close(weight, torch.tensor([1.0, 1.0, 0.05]))


def test_nonpositive_gamma_is_a_config_error():
    schedule = NoiseSchedule(ScheduleConfig())
    _, noise, model_output, t = batch()
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        diffusion_loss(model_output, noise, t, schedule, min_snr_gamma=0.0)


def test_sample_noise_without_offset_is_seeded_randn():
    x0 = torch.zeros(2, 4, 6, 6)
    noise = sample_noise(x0, 0.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(noise, torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)))


def test_offset_noise_adds_a_per_channel_constant():
    x0 = torch.zeros(2, 4, 6, 6, dtype=torch.bfloat16)
    noise = sample_noise(x0, 0.1, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.bfloat16)
    offset = torch.randn(2, 4, 1, 1, generator=generator, dtype=torch.bfloat16)
    assert noise.dtype == torch.bfloat16 and noise.shape == x0.shape
    torch.testing.assert_close(noise, base + 0.1 * offset)
    # the difference to the plain noise is constant over each (sample, channel) plane
    shift = (noise - base).float()
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-2) and shift.abs().max() > 0


def test_negative_offset_noise_is_a_config_error():
    with pytest.raises(ConfigError, match="offset_noise"):
        sample_noise(torch.zeros(1, 1, 2, 2), -0.1)
