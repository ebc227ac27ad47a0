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

import numpy as np
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


@torch.no_grad()
def sample_dpmpp_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) with ancestral noise, k-diffusion's `dpmpp_sde` and diffusers' DPMSolverSDEScheduler.

    Each step makes a noisy half step (in λ = −log σ) to the midpoint, evaluates D there and finishes the
    step with the average of both D's (Lu et al. 2022, Algorithm 1 with r = 1/2); Euler on the step to 0.
    Noise is drawn fresh per sub-step (diffusers uses a Brownian tree: the same law, other draws).
    """
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)  # λ halfway: exp(−(λ + h/2))
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_mid, eta)
            x_mid = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down / sigma)) * denoised
            if sigma_up > 0:
                x_mid = x_mid + randn_like(x, generator) * sigma_up
            denoised_mid = denoise(x_mid, sigma_mid)
            sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
            x = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down / sigma)) * denoised_mid
            if sigma_up > 0:
                x = x + randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i + 1, len(steps))
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022, §5), written as diffusers' third-order `sde-dpmsolver++` update.

    The order grows with the history (1, 2, then 3); the step before the last is second order and the
    last one, to σ = 0, returns D (diffusers' `lower_order_final`), which keeps few-step runs stable.
    """
    steps = _steps(sigmas)
    history: list[tuple[float, torch.Tensor]] = []  # (λ, D) of the last evaluations, newest last
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        history = (history + [(-math.log(sigma), denoised)])[-3:]
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            order = min(len(history), 2 if i == len(steps) - 2 else 3)
            decay = -math.expm1(-2 * h)  # 1 − e^(−2h)
            x = (sigma_next / sigma) * math.exp(-h) * x + decay * denoised
            if order >= 2:
                (lambda_1, m1), (lambda_0, m0) = history[-2], history[-1]
                r0 = (lambda_0 - lambda_1) / h
                d1_0 = (m0 - m1) / r0
            if order == 2:
                x = x + 0.5 * decay * d1_0
            elif order == 3:
                lambda_2, m2 = history[-3]
                r1 = (lambda_1 - lambda_2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + (decay / (-2 * h) + 1) * d1 + ((decay - 2 * h) / (2 * h) ** 2 - 0.5) * d2
            x = x + randn_like(x, generator) * sigma_next * math.sqrt(decay)
        if callback is not None:
            callback(i + 1, len(steps))
    return x


def _lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """∫ from σ_i to σ_(i+1) of the Lagrange basis polynomial through σ_i, …, σ_(i−order+1) that is 1 at σ_(i−j)."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial([1.0])
    for other in others:
        basis = basis * np.polynomial.Polynomial([-other, 1.0]) / (sigmas[i - j] - other)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams–Bashforth in σ, k-diffusion's `lms`, diffusers' LMSDiscreteScheduler).

    dx/dσ is interpolated through the last `order` derivatives and the polynomial integrated exactly over
    the step (diffusers integrates the same polynomial numerically).
    """
    if not 1 <= order <= 4:
        raise ConfigError(f"lms order must be 1 to 4, got {order}")
    order = int(order)
    steps = _steps(sigmas)
    values = [sigma for sigma, _ in steps] + [steps[-1][1]] if steps else []
    derivatives: list[torch.Tensor] = []  # newest first
    for i, (sigma, sigma_next) in enumerate(steps):
        derivatives = [to_d(x, sigma, denoise(x, sigma))] + derivatives[: order - 1]
        current = min(i + 1, order)
        for j, d in enumerate(derivatives[:current]):
            x = x + _lms_coefficient(values, i, current, j) * d
        if callback is not None:
            callback(i + 1, len(steps))
    return x


def _unipc_update(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    history: list[tuple[float, torch.Tensor]],
    order: int,
    denoised_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniP (predictor) or, given D at σ_next, UniC (corrector) step of UniPC-bh2 from σ to σ_next.

    `history` holds (λ, D) newest last, its last entry at σ; both use the `order` − 1 entries before it.
    Written as diffusers' `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` divided by α_t.
    """
    lambda_0, m0 = history[-1]
    h = math.log(sigma / sigma_next)
    rks, d1s = [], []
    for k in range(1, order):
        lambda_k, m_k = history[-(k + 1)]
        rk = (lambda_k - lambda_0) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    h_phi_1 = math.expm1(-h)
    h_phi_k = h_phi_1 / -h - 1
    b_h = h_phi_1  # bh2: B(h) = e^h − 1 in the data-prediction sign
    factorial, rows, b = 1, [], []
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / -h - 1 / factorial
    x_next = (sigma_next / sigma) * x - h_phi_1 * m0
    if denoised_next is None:  # predictor
        if not d1s:
            return x_next
        rhos = [0.5] if order == 2 else np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1]).tolist()
        return x_next - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(np.array(rows), np.array(b)).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
    return x_next - b_h * (correction + rhos[-1] * (denoised_next - m0))


@torch.no_grad()
def sample_unipc(
    denoise: Denoise,
    x: torch.Tensor,
    sigmas: Sigmas,
    *,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 2,
) -> torch.Tensor:
    """UniPC multistep, bh2, data prediction (Zhao et al. 2023, Algorithms 2-3; diffusers' UniPCMultistepScheduler).

    Each step first corrects the previous step's result with the D just evaluated there (UniC, which
    costs no extra evaluation), then predicts the next (UniP). The order warms up to `order` (2 or 3)
    and falls back at the end so that the step to σ = 0 is first order (diffusers' `lower_order_final`).
    """
    if order not in (1, 2, 3):
        raise ConfigError(f"unipc order must be 1, 2 or 3, got {order}")
    order = int(order)
    steps = _steps(sigmas)
    history: list[tuple[float, torch.Tensor]] = []
    previous = None  # (x before the last prediction, its σ, its order)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoise(x, sigma)
        if previous is not None:
            x_last, sigma_last, order_last = previous
            x = _unipc_update(x_last, sigma_last, sigma, history, order_last, denoised_next=denoised)
        history = (history + [(-math.log(sigma), denoised)])[-order:]
        step_order = min(order, len(steps) - i, len(history))
        previous = (x, sigma, step_order)
        x = denoised if sigma_next == 0 else _unipc_update(x, sigma, sigma_next, history, step_order)
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
    "dpmpp_sde": Sampler(sample_dpmpp_sde, {"eta": 1.0}, stochastic=True),
    "dpmpp_3m_sde": Sampler(sample_dpmpp_3m_sde, stochastic=True),
    "lms": Sampler(sample_lms, {"order": 4}),
    "unipc": Sampler(sample_unipc, {"order": 2}),
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
