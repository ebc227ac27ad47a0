"""The LDM autoencoder loss against closed forms, and the PatchGAN discriminator's shape and init."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm_cli.autoencoder.discriminator import DiscriminatorConfig, PatchDiscriminator
from ldm_cli.autoencoder.loss import AutoencoderLoss, AutoencoderLossConfig, adaptive_weight, hinge_d_loss
from ldm_cli.autoencoder.model import DiagonalGaussian
from ldm_cli.errors import ConfigError

SMALL_DISC = DiscriminatorConfig(base_channels=8, num_layers=2)


class CountingFirstChannel(nn.Module):
    """Stub discriminator: the logits are the image's first channel; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x[:, :1]


class ConstantLPIPS(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, x, y):
        return self.values


def _loss(disc_start=0, **overrides) -> AutoencoderLoss:
    config = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=disc_start, disc=SMALL_DISC, **overrides)
    return AutoencoderLoss(config, lpips=None)


def _posterior(batch=2):
    mean = torch.linspace(-1, 1, batch * 4 * 2 * 2).view(batch, 4, 2, 2)
    return DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -0.5)], dim=1))


def test_reconstruction_and_kl_terms_before_disc_start_skip_the_discriminator():
    torch.manual_seed(0)
    loss_fn = _loss(disc_start=100, logvar_init=0.5, kl_weight=1e-2)
    loss_fn.discriminator = CountingFirstChannel()
    inputs, reconstructions = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    posterior = _posterior()

    loss, logs = loss_fn.generator_loss(inputs, reconstructions, posterior, step=99, last_layer=torch.zeros(1))
    # nll = sum(|x - x̂| / e^logvar + logvar) / batch ; kl = mean over batch of per-sample sums
    logvar, batch, pixels = 0.5, 2, 3 * 4 * 4
    nll = ((inputs - reconstructions).abs().sum() / math.exp(logvar) + logvar * batch * pixels) / batch
    mean, var = posterior.mean, math.exp(-0.5)
    kl = 0.5 * (mean**2 + var - 1 + 0.5).sum() / batch
    torch.testing.assert_close(logs["nll_loss"], nll)
    torch.testing.assert_close(logs["kl_loss"], kl)
    torch.testing.assert_close(loss, nll + 1e-2 * kl)
    assert "g_loss" not in logs

    d_loss, d_logs = loss_fn.discriminator_loss(inputs, reconstructions, step=99)
    assert d_loss.item() == 0.0 and d_logs["disc_loss"].item() == 0.0
    d_loss.backward()  # harmless, so a training loop may call it unconditionally
    assert loss_fn.discriminator.calls == 0
    assert not loss_fn.disc_active(99) and loss_fn.disc_active(100)


def test_perceptual_distance_is_added_to_every_pixel():
    config = AutoencoderLossConfig(perceptual_weight=2.0, disc_start=10**9, disc=SMALL_DISC)
    loss_fn = AutoencoderLoss(config, lpips=ConstantLPIPS(torch.tensor([0.25, 1.0])))
    inputs, reconstructions = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    _, logs = loss_fn.generator_loss(inputs, reconstructions, _posterior(), step=0, last_layer=torch.zeros(1))
    # per sample: 48 pixels * (0.5 + 2 * p_i), then the batch mean; logvar = 0
    expected = 48 * ((0.5 + 2 * 0.25) + (0.5 + 2 * 1.0)) / 2
    torch.testing.assert_close(logs["nll_loss"], torch.tensor(expected))
    with pytest.raises(ConfigError, match="perceptual_weight=0"):
        AutoencoderLoss(config, lpips=None)


def test_hinge_loss_closed_form_with_stub_discriminator():
    loss_fn = _loss(disc_start=5, disc_factor=0.8)
    loss_fn.discriminator = CountingFirstChannel()
    inputs = torch.zeros(1, 3, 1, 2)
    inputs[0, 0] = torch.tensor([2.0, 0.0])  # relu(1 - D(x)) = [0, 1] -> mean 0.5
    reconstructions = torch.zeros(1, 3, 1, 2, requires_grad=True)
    with torch.no_grad():
        reconstructions[0, 0] = torch.tensor([-0.5, 1.0])  # relu(1 + D(x̂)) = [0.5, 2] -> mean 1.25
    d_loss, logs = loss_fn.discriminator_loss(inputs, reconstructions, step=5)
    torch.testing.assert_close(d_loss, torch.tensor(0.8 * 0.5 * (0.5 + 1.25)))
    torch.testing.assert_close(logs["logits_real"], torch.tensor(1.0))
    assert loss_fn.discriminator.calls == 2
    assert not d_loss.requires_grad  # the reconstruction is detached: no grad to the autoencoder
    torch.testing.assert_close(hinge_d_loss(torch.tensor([3.0]), torch.tensor([-3.0])), torch.tensor(0.0))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    loss_fn = _loss(disc_start=0, disc_weight=0.5, disc_factor=1.0, kl_weight=1e-3)
    last_layer = nn.Parameter(torch.randn(3, 5, 1, 1) * 0.3)
    hidden, inputs = torch.randn(2, 5, 16, 16), torch.randn(2, 3, 16, 16)
    posterior = _posterior()

    reconstructions = F.conv2d(hidden, last_layer)
    loss, logs = loss_fn.generator_loss(inputs, reconstructions, posterior, step=0, last_layer=last_layer)

    # independently, on a fresh graph
    reconstructions = F.conv2d(hidden, last_layer)
    nll = (inputs - reconstructions).abs().sum() / 2
    g_loss = -loss_fn.discriminator(reconstructions).mean()
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer)
    expected_weight = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(logs["d_weight"], expected_weight)
    torch.testing.assert_close(logs["g_loss"], g_loss.detach())
    expected_total = nll + 1e-3 * posterior.kl().mean() + expected_weight * g_loss
    torch.testing.assert_close(loss, expected_total, rtol=1e-5, atol=1e-5)

    # the loss still backpropagates after the weight's own autograd.grad calls; logvar learns
    loss.backward()
    assert last_layer.grad is not None and loss_fn.logvar.grad is not None and loss_fn.logvar.grad != 0
    assert any(p is loss_fn.logvar for p in loss_fn.parameters())


def test_adaptive_weight_without_gradients_and_clamped():
    loss_fn = _loss(disc_start=0)
    last_layer = nn.Parameter(torch.randn(3, 5, 1, 1))
    hidden, inputs = torch.randn(2, 5, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # validation: no graph, weight 0, no error
        loss, logs = loss_fn.generator_loss(inputs, F.conv2d(hidden, last_layer), _posterior(), 0, last_layer)
    assert logs["d_weight"].item() == 0.0
    torch.testing.assert_close(loss, logs["nll_loss"] + 1e-6 * logs["kl_loss"])

    reconstructions = F.conv2d(hidden, last_layer)
    nll = reconstructions.abs().sum()
    tiny_gan = -1e-12 * reconstructions.mean()
    assert adaptive_weight(nll, tiny_gan, last_layer).item() == 1e4


def test_patch_discriminator_shape_init_and_size():
    torch.manual_seed(0)
    default = PatchDiscriminator(DiscriminatorConfig())
    # pix2pix / taming NLayerDiscriminator(3, ndf=64, n_layers=3): 2,765,633 parameters
    assert sum(p.numel() for p in default.parameters()) == 2_765_633
    assert sum(isinstance(m, nn.BatchNorm2d) for m in default.modules()) == 3
    conv_weights = torch.cat([m.weight.flatten() for m in default.modules() if isinstance(m, nn.Conv2d)])
    assert abs(conv_weights.std().item() - 0.02) < 0.001 and abs(conv_weights.mean().item()) < 0.001
    bn_weights = torch.cat([m.weight for m in default.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn_weights.mean().item() - 1.0) < 0.01

    small = PatchDiscriminator(DiscriminatorConfig(base_channels=4, num_layers=3))
    # 256 -> 128 -> 64 -> 32 -> 31 -> 30: the classic 70x70-receptive-field 30x30 patch map
    assert small(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    assert PatchDiscriminator(SMALL_DISC)(torch.randn(1, 3, 32, 32)).shape == (1, 1, 6, 6)
