"""The LDM autoencoder objective: L1 + LPIPS under a learned variance, a tiny KL, and a PatchGAN.

Generator (autoencoder) step, per sample summed over pixels and averaged over the batch:
    rec   = |x - x̂| + perceptual_weight * LPIPS(x, x̂)
    nll   = rec / exp(logvar) + logvar                    (logvar: one learned scalar)
    total = nll + kl_weight * KL(q(z|x) || N(0, I)) + λ * disc_factor * (-mean D(x̂))
    λ     = disc_weight * ||∇_last nll|| / (||∇_last g_loss|| + 1e-4)   (adaptive, detached)
Discriminator step: hinge loss. The GAN terms switch on at step `disc_start`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm_cli.autoencoder.discriminator import DiscriminatorConfig, PatchDiscriminator
from ldm_cli.autoencoder.lpips import LPIPS
from ldm_cli.autoencoder.model import DiagonalGaussian
from ldm_cli.errors import ConfigError


@dataclass
class AutoencoderLossConfig:
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_factor: float = 1.0
    logvar_init: float = 0.0
    lpips_vgg_path: str | None = None
    lpips_heads_path: str | None = None
    # train the decoder only (encoder and quant_conv frozen): latents encoded before stay valid, as SD's ft-MSE VAE
    decoder_only: bool = False
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _grad(term: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    # retain_graph: the caller still backpropagates the total loss through the same graph
    (grad,) = torch.autograd.grad(term, parameter, retain_graph=True, allow_unused=True)
    if grad is None:  # the term does not depend on this parameter
        return torch.zeros_like(parameter, dtype=torch.float32)
    return grad.float()


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, average: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """Scale the GAN gradient to the reconstruction gradient's size at the decoder's last layer.

    `average` turns one process's gradients into the global batch's (the mean over processes).
    Returns 0 where those gradients do not exist (no_grad / eval), so validation still works.
    """
    if not (torch.is_grad_enabled() and last_layer.requires_grad and nll_loss.requires_grad and g_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grad, g_grad = _grad(nll_loss, last_layer), _grad(g_loss, last_layer)
    if average is not None:
        nll_grad, g_grad = average(nll_grad), average(g_grad)
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach()


class AutoencoderLoss(nn.Module):
    """Holds the learnable `logvar` and the discriminator; LPIPS is frozen and shared."""

    def __init__(self, config: AutoencoderLossConfig, lpips: LPIPS | None):
        super().__init__()
        if config.perceptual_weight > 0 and lpips is None:
            raise ConfigError(
                "loss.perceptual_weight > 0 needs LPIPS (see load_lpips), or set loss.perceptual_weight=0"
            )
        self.config = config
        self.lpips = lpips if config.perceptual_weight > 0 else None
        self.logvar = nn.Parameter(torch.tensor(float(config.logvar_init)))
        self.discriminator = PatchDiscriminator(config.disc)

    def disc_active(self, step: int) -> bool:
        """Whether the GAN terms are on at this step (the training loop may skip the D step otherwise)."""
        return step >= self.config.disc_start and self.config.disc_factor > 0

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor,
        average: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = inputs.shape[0]
        rec_loss = (inputs - reconstructions).abs().float()
        if self.lpips is not None:
            perceptual = self.lpips(inputs, reconstructions)  # [B]
            # LDM adds the per-image distance to every pixel's L1 term
            rec_loss = rec_loss + self.config.perceptual_weight * perceptual.view(batch, 1, 1, 1)
        nll_loss = (rec_loss / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl_loss = posterior.kl().mean()
        loss = nll_loss + self.config.kl_weight * kl_loss
        logs = {
            "rec_loss": rec_loss.detach().mean(),
            "nll_loss": nll_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "logvar": self.logvar.detach(),
        }

        if self.disc_active(step):  # before disc_start D is not run at all
            g_loss = -self.discriminator(reconstructions).float().mean()
            d_weight = adaptive_weight(nll_loss, g_loss, last_layer, average) * self.config.disc_weight
            loss = loss + d_weight * self.config.disc_factor * g_loss
            logs |= {"g_loss": g_loss.detach(), "d_weight": d_weight.detach()}
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss; `discriminator` is this loss's own, or a wrapper of it (DistributedDataParallel)."""
        discriminator = self.discriminator if discriminator is None else discriminator
        if not self.disc_active(step):
            # a leaf zero: backward() on it is harmless, and D is not evaluated
            zero = torch.zeros((), device=inputs.device, requires_grad=True)
            return zero, {"disc_loss": zero.detach()}
        logits_real = discriminator(inputs.detach()).float()
        logits_fake = discriminator(reconstructions.detach()).float()
        d_loss = self.config.disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs
