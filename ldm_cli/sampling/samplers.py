"""Samplers in the variance-exploding view x = x_0 + σ ε (k-diffusion style).

Every sampler is `sampler(denoise, x, sigmas, *, generator=None, callback=None, **options) -> x` where
`denoise(x, sigma) -> x0_hat` (see `denoiser.py`), `sigmas` descends to 0 and x starts as noise · sigmas[0]
(img2img: x_0 + noise · sigmas[k] with the slice sigmas[k:]). Randomness comes only from `generator`:
one for the whole batch, or one per image (a list), so that each image's noise is its own stream whatever
its batch. `callback(step, total)` is called after each step with step = 1 … total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ldm_cli.errors import ConfigError
from ldm_cli.noise import Generators as Generator
from ldm_cli.noise import randn_like

Denoise = Callable[[torch.Tensor, float], torch.Tensor]
Sigmas = torch.Tensor | list[float]
Callback = Callable[[int, int], None] | None


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step σ_from → σ_to into a deterministic step to σ_down and fresh noise of std σ_up.

    σ_up = η σ_to sqrt(1 − σ_to²/σ_from²) is DDIM's σ_t(η) (Song et al. 2021, eq. 16) in VE units;
    σ_down² + σ_up² = σ_to², so the marginal noise level is right whatever η.
    """
    if eta == 0 or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * sigma_to * math.sqrt(1 - sigma_to**2 / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _steps(sigmas: Sigmas) -> list[tuple[float, float]]:
    # python floats: branching on σ then costs no GPU sync
    values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]
    return list(zip(values[:-1], values[1:]))


@torch.no_grad()
def sample_euler(
    denoise: Denoise, x: torch.Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        x = x + to_d(x, sigma, denoise(x, sigma)) * (sigma_next - sigma)
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler (k-diffusion): an Euler step down to σ_down, then fresh noise of std σ_up."""
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoise, x: torch.Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); the last step to σ = 0 is Euler."""
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        d = to_d(x, sigma, denoise(x, sigma))
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, denoise(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoise, x: torch.Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with λ = −log σ; first order on the first and last step."""
    steps = _steps(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            if old_denoised is None:
                denoised_d = denoised
            else:  # linear extrapolation of D in λ from the last two evaluations
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), midpoint variant (Lu et al. 2022, §5); eta = 0 is the ODE solver, 1 the full SDE."""
    steps = _steps(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) / r * (denoised - old_denoised)
            if eta > 0:
                x = x + randn_like(x, generator) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) divided through by sqrt(ᾱ_prev), i.e. in σ space:

    x_prev = x̂_0 + sqrt(σ_next² − σ_up²) ε̂ + σ_up z with ε̂ = (x − x̂_0)/σ and σ_up DDIM's σ_t(η).
    Deterministic for eta = 0 (then identical to Euler); eta = 1 is the DDPM posterior.
    """
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_ddpm(
    denoise: Denoise, x: torch.Tensor, sigmas: Sigmas, *, generator: Generator = None, callback: Callback = None
) -> torch.Tensor:
    """Ancestral DDPM (Ho et al. 2020, eq. 7) on the given σ's: draw from the posterior q(x_next | x, x̂_0).

    In σ space the posterior is N(x̂_0 + (σ_next²/σ²)(x − x̂_0), σ_next² (1 − σ_next²/σ²)).
    """
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        ratio = (sigma_next / sigma) ** 2
        x = denoised + ratio * (x - denoised)
        if sigma_next > 0:
            x = x + randn_like(x, generator) * sigma_next * math.sqrt(1 - ratio)
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its function, the options it takes with their defaults, and whether it adds
    fresh noise (then it needs a generator per image for batch-independent images)."""

    fn: Callable[..., torch.Tensor]
    options: dict[str, float] = field(default_factory=dict)
    stochastic: bool = False

    def __call__(self, denoise: Denoise, x: torch.Tensor, sigmas: Sigmas, **kwargs) -> torch.Tensor:
        return self.fn(denoise, x, sigmas, **kwargs)

    def is_stochastic(self, options: dict[str, float]) -> bool:
        """Whether this run adds noise: an `eta` of 0 makes the ancestral/SDE samplers deterministic."""
        return self.stochastic and {**self.options, **options}.get("eta", 1.0) != 0


# Add a sampler: write `sample_<name>(denoise, x, sigmas, *, generator, callback, **options)` above and
# register it here; the CLI, PNG metadata and --replay pick it up from this table.
SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(sample_ddim, {"eta": 0.0}, stochastic=True),
    "ddpm": Sampler(sample_ddpm, stochastic=True),
    "euler": Sampler(sample_euler),
    "euler_ancestral": Sampler(sample_euler_ancestral, {"eta": 1.0}, stochastic=True),
    "heun": Sampler(sample_heun),
    "dpmpp_2m": Sampler(sample_dpmpp_2m),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, {"eta": 1.0}, stochastic=True),
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    name: str,
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    **options: float,
) -> torch.Tensor:
    """Run the sampler called `name`, turning an unknown name or option into a ConfigError."""
    sampler = get_sampler(name)
    unknown = sorted(set(options) - set(sampler.options))
    if unknown:
        raise ConfigError(
            f"sampler {name!r} takes no option {', '.join(unknown)}; it takes: {', '.join(sampler.options) or 'no options'}"
        )
    return sampler(denoise, x, sigmas, generator=generator, callback=callback, **options)
