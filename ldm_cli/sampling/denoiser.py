"""The one interface samplers see: `denoise(x, sigma) -> x0_hat` with x = x_0 + σ ε (k-diffusion style).

`Denoiser` wraps a discrete-time network `model_fn(x_t, t, **cond)` trained on a `NoiseSchedule`
(ε, v or x_0 prediction) and `get_sigmas` picks the σ grid a sampler walks down.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ldm_cli.diffusion.schedule import NoiseSchedule
from ldm_cli.errors import ConfigError

SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential")


class Denoiser:
    """x_0 estimate D(x; σ) from a network trained on the discrete schedule (Karras et al. 2022, Table 1, VP).

    The network sees x_t = c_in · x with c_in = 1/sqrt(σ² + 1) and the timestep t whose σ_t is σ, found by
    interpolating log σ over the schedule's σ table (exact at grid points). `quantize=True` rounds t to
    the nearest training timestep.
    """

    def __init__(self, model_fn: Callable[..., torch.Tensor], schedule: NoiseSchedule, quantize: bool = False):
        self.model_fn = model_fn
        self.prediction_type = schedule.prediction_type
        self.quantize = quantize
        self.log_sigmas = schedule.sigmas.log()
        self.sigma_min, self.sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        if self.log_sigmas.device != device:
            self.log_sigmas = self.log_sigmas.to(device)  # once, not every step
        return self.log_sigmas

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for each σ (float32, same shape), clamped to [0, T − 1]."""
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.float().log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        low_log_sigma, high_log_sigma = log_sigmas[low], log_sigmas[low + 1]
        weight = ((log_sigma - low_log_sigma) / (high_log_sigma - low_log_sigma)).clamp(0, 1)
        t = low + weight
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at a (continuous) timestep, interpolating log σ like `sigma_to_t`."""
        log_sigmas = self._log_sigmas_on(t.device)
        t = t.float().clamp(0, len(log_sigmas) - 1)
        low = t.floor().long().clamp(max=len(log_sigmas) - 2)
        weight = t - low
        return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[low + 1]).exp()

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, **cond: Any) -> torch.Tensor:
        """D(x; σ) for x [B, ...]: [B, ...], or [n·B, ...] where the network answers each x for n texts."""
        # sigma: a python float (what samplers pass), filled on the device without a host copy or sync;
        # or a 0-dim tensor, or one σ per sample
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(dtype=torch.float32, device=x.device).expand(x.shape[0])
        else:
            sigma = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = (sigma_b**2 + 1).rsqrt()
        model_output = self.model_fn(x * c_in, self.sigma_to_t(sigma), **cond)
        copies = model_output.shape[0] // x.shape[0]  # one x with n texts (guidance): n outputs per row of x
        if copies > 1:
            x, sigma_b, c_in = (torch.cat([value] * copies) for value in (x, sigma_b, c_in))
        if self.prediction_type == "epsilon":
            return x - sigma_b * model_output
        if self.prediction_type == "v_prediction":
            # x_0 = α x_t − σ_t v with α = c_in and σ_t = σ c_in in the VP view
            return x * c_in**2 - sigma_b * c_in * model_output
        return model_output.to(x.dtype)


def get_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 1) -> torch.Tensor:
    """Descending training timesteps (int64) for `steps` sampling steps; spacings as in Lin et al. 2023, Table 2.

    leading: 0, k, 2k, … (+ steps_offset; SD uses 1); trailing: counts down from T − 1; linspace: evenly
    from T − 1 to 0, rounded.
    """
    num_train_timesteps = schedule.num_train_timesteps
    if spacing not in ("leading", "trailing", "linspace"):
        raise ConfigError(f"timestep spacing must be leading, trailing or linspace, got {spacing!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    # numpy, as diffusers does, so that rounding ties land on the same integers
    if spacing == "leading":
        timesteps = np.arange(steps)[::-1] * (num_train_timesteps // steps) + steps_offset
        if timesteps[0] >= num_train_timesteps or steps_offset < 0:
            raise ConfigError(
                f"steps_offset={steps_offset} puts leading timesteps outside 0..{num_train_timesteps - 1}"
            )
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps))[:steps] - 1
    else:
        timesteps = np.linspace(0, num_train_timesteps - 1, steps).round()[::-1]
    return torch.from_numpy(timesteps.astype(np.int64))


def get_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 1, rho: float = 7.0
) -> torch.Tensor:
    """Descending σ's for `steps` sampling steps, float32, length steps + 1, ending in 0.

    leading / trailing / linspace: σ at the training timesteps of `get_timesteps` (so the network sees
    integer timesteps). karras: σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ between the
    schedule's σ_min and σ_max (Karras et al. 2022, eq. 5). exponential: log σ evenly spaced between the
    same ends (diffusers' `use_exponential_sigmas`).
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"sigma spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if spacing == "karras":
        if steps < 1:
            raise ConfigError(f"steps must be at least 1, got {steps}")
        sigma_min, sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        sigmas = sigmas.float()
    elif spacing == "exponential":
        if steps < 1:
            raise ConfigError(f"steps must be at least 1, got {steps}")
        sigma_min, sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp().float()
    else:
        sigmas = schedule.sigmas.cpu()[get_timesteps(schedule, steps, spacing, steps_offset)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])
