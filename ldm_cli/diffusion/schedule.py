"""The discrete DDPM noise schedule: betas → ᾱ_t, the forward process and the training targets.

Notation (Ho et al. 2020): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε.  Samplers work in the
variance-exploding view x = x_0 + σ ε with σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) (Karras et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm_cli.errors import ConfigError

BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # "scaled_linear" | "linear" | "cosine" (squaredcos_cap_v2)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, Algorithm 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError(f"schedule.num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"schedule.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"schedule.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        if self.beta_schedule != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                "schedule needs 0 < beta_start <= beta_end < 1, "
                f"got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "schedule.rescale_betas_zero_snr=true cannot be used with prediction_type=epsilon "
                "(x_0 is undefined from ε at zero SNR); set prediction_type=v_prediction"
            )


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021: ᾱ(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008, betas capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_T = 0 while ᾱ_0 is kept."""
    sqrt_alphas_cumprod = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    steps = config.num_train_timesteps
    if config.beta_schedule == "linear":  # Ho et al. 2020
        betas = torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(β)
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(steps)
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like`, in its dtype and device."""
    picked = values.to(like.device)[t.to(like.device).long()]
    return picked.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule:
    """Tensors of the discrete schedule (float32, index t = 0 … T−1) and the forward-process maths."""

    def __init__(self, config: ScheduleConfig):
        config.validate()
        self.config = config
        self.prediction_type = config.prediction_type
        self.num_train_timesteps = config.num_train_timesteps
        self.betas = make_betas(config)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # increasing in t
        if config.rescale_betas_zero_snr:
            # ᾱ_T = 0 makes σ_T infinite; samplers need a finite start, so extend log σ linearly
            # (≈ 4500 for SD's betas; diffusers uses 4096; either is pure noise after c_in scaling)
            self.sigmas[-1] = self.sigmas[-2] ** 2 / self.sigmas[-3]

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Keep the tables on the training device so indexing them needs no copy per step."""
        self.betas, self.alphas_cumprod, self.sigmas = (
            table.to(device) for table in (self.betas, self.alphas_cumprod, self.sigmas)
        )
        return self

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_cumprod = _per_sample(self.alphas_cumprod, t, like)
        return alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns: ε, v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x_0 (Salimans & Ho 2022), or x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * noise - sigma * x0

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sigma * model_output
        return model_output

    def predict_eps(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return sigma * x_t + alpha * model_output
        return (x_t - alpha * model_output) / sigma

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), shape (B,), on t's device."""
        alpha_cumprod = self.alphas_cumprod.to(t.device)[t.long()]
        return alpha_cumprod / (1 - alpha_cumprod)
