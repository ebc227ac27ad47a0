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
