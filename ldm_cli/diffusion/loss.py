"""The diffusion training loss (no model inside): weighted MSE to the schedule's target, and the noise."""

from __future__ import annotations

import torch

from ldm_cli.diffusion.schedule import NoiseSchedule
from ldm_cli.errors import ConfigError


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023), expressed for each prediction target.

    The x_0-space weight is min(SNR, γ); an ε-loss already carries a factor SNR and a v-loss SNR + 1,
    so those are divided out. At SNR = 0 (zero-terminal-SNR schedules) the ε weight tends to 1.
    """
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, γ) / SNR, finite at SNR = 0
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean over the batch of each sample's MSE, optionally min-SNR-γ weighted; a scalar in float32."""
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ConfigError(f"min_snr_gamma must be positive (5.0 is the paper's value) or null, got {min_snr_gamma}")
    # float32 so the loss is exact under bf16 autocast
    per_sample = (model_output.float() - target.float()).square().mean(dim=tuple(range(1, model_output.ndim)))
    if min_snr_gamma is None:
        return per_sample.mean()
    weight = min_snr_weight(schedule.snr(t.to(per_sample.device)), min_snr_gamma, schedule.prediction_type)
    return (weight * per_sample).mean()


def sample_noise(x0: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε ~ N(0, I) for x0's shape, plus offset noise (Guttenberg 2023): offset · N(0, 1) per (sample, channel).

    The per-channel constant lets the model learn to change an image's mean brightness.
    """
    if offset_noise < 0:
        raise ConfigError(f"offset_noise must be >= 0 (0.05–0.1 is typical), got {offset_noise}")
    noise = _randn(x0.shape, x0, generator)
    if offset_noise > 0:
        noise = noise + offset_noise * _randn((*x0.shape[:2], *([1] * (x0.ndim - 2))), x0, generator)
    return noise


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # draw on the generator's device, then move: a CPU generator gives the same noise on any device
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
