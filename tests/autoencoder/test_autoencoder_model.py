"""The from-scratch KL autoencoder against diffusers' AutoencoderKL (same weights, same outputs)."""

import math

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as DiffusersAutoencoderKL

from ldm_cli.autoencoder.model import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    downsampling_factor,
    tiled_decode,
)


def _diffusers_vae(config: AutoencoderConfig) -> DiffusersAutoencoderKL:
    blocks = len(config.block_out_channels)
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        block_out_channels=list(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        mid_block_add_attention=config.mid_block_add_attention,
    )


def _tiny_config(**overrides) -> AutoencoderConfig:
    return AutoencoderConfig(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, **overrides)


def test_kl_f8_defaults_match_stable_diffusion_size_and_diffusers_keys():
    with torch.device("meta"):
        ours = AutoencoderKL(AutoencoderConfig())
        reference = _diffusers_vae(AutoencoderConfig())
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert ours.downsampling_factor == 8 == AutoencoderConfig().downsampling_factor
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes
    assert ours.last_layer is ours.decoder.conv_out.weight


@pytest.mark.parametrize(
    "config",
    [
        _tiny_config(),
        AutoencoderConfig(block_out_channels=[8, 16, 16], norm_num_groups=8, layers_per_block=2,
                          mid_block_add_attention=False),
    ],
    ids=["1-layer-attention", "2-layer-no-attention"],
)
def test_matches_diffusers_with_copied_weights(config):
    torch.manual_seed(0)
    reference = _diffusers_vae(config).eval()
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)

    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        posterior = ours.encode(image)
        reference_posterior = reference.encode(image).latent_dist
        torch.testing.assert_close(posterior.mean, reference_posterior.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(posterior.logvar, reference_posterior.logvar, atol=1e-5, rtol=1e-5)
        factor = downsampling_factor(config)
        assert posterior.mean.shape == (2, config.latent_channels, 16 // factor, 16 // factor)

        z = torch.randn(2, config.latent_channels, 5, 6)  # odd sizes: no square assumption
        torch.testing.assert_close(ours.decode(z), reference.decode(z).sample, atol=1e-5, rtol=1e-5)

        # the full forward with the same seeded noise
        reconstruction, _ = ours(image, generator=torch.Generator().manual_seed(3))
        reference_out = reference(image, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        torch.testing.assert_close(reconstruction, reference_out, atol=1e-5, rtol=1e-5)


def test_posterior_kl_matches_closed_form_and_logvar_is_clamped():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([0.0, 1.0, -2.0, 0.3]).view(1, 4, 1, 1)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # KL(N(m, s^2) || N(0, 1)) = 0.5 * (m^2 + s^2 - 1 - log s^2), summed over elements
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum()
    torch.testing.assert_close(posterior.kl(), expected.view(1))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    torch.testing.assert_close(posterior.kl(), reference.view(1))
    assert posterior.mode() is posterior.mean

    clamped = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 100.0)], dim=1))
    assert torch.all(clamped.logvar == 20.0)
    assert torch.all(DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, -100.0)], dim=1)).logvar == -30.0)


def test_posterior_sample_is_seeded_and_has_the_right_spread():
    std = 0.5
    moments = torch.cat([torch.full((4, 4, 16, 16), 3.0), torch.full((4, 4, 16, 16), 2 * math.log(std))], dim=1)
    posterior = DiagonalGaussian(moments)
    first = posterior.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, posterior.sample(torch.Generator().manual_seed(1)))
    assert abs(first.mean().item() - 3.0) < 0.05
    assert abs(first.std().item() - std) < 0.05


class _PointwiseDecoder:
    """A decoder with no spatial context: tiling it must reproduce the plain decode exactly."""

    downsampling_factor = 4

    def __init__(self):
        self.mix = torch.nn.Conv2d(4, 3, 1)

    def decode(self, z):
        return torch.nn.functional.interpolate(self.mix(z), scale_factor=4, mode="nearest")


def test_tiled_decode_places_and_blends_tiles_exactly():
    torch.manual_seed(0)
    model = _PointwiseDecoder()
    z = torch.randn(2, 4, 23, 17)
    with torch.no_grad():
        tiled = tiled_decode(model, z, tile_latent=8, overlap=3)
        torch.testing.assert_close(tiled, model.decode(z), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(tiled_decode(model, z, tile_latent=5, overlap=0), model.decode(z))


def test_tiled_decode_matches_plain_decode():
    torch.manual_seed(0)
    model = AutoencoderKL(_tiny_config()).eval()
    with torch.no_grad():
        small = torch.randn(1, 4, 6, 6)
        torch.testing.assert_close(tiled_decode(model, small, tile_latent=8, overlap=2), model.decode(small))

        z = torch.randn(1, 4, 20, 14)
        plain = model.decode(z)
        tiled = tiled_decode(model, z, tile_latent=16, overlap=8)
    assert tiled.shape == plain.shape == (1, 3, 40, 28)
    # each tile has its own GroupNorm statistics and attention context (as in diffusers' tiling):
    # close to the plain decode, not equal
    relative_error = (tiled - plain).abs().mean() / plain.abs().mean()
    assert relative_error < 0.1, relative_error
    with pytest.raises(ValueError):
        tiled_decode(model, z, tile_latent=8, overlap=8)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = AutoencoderKL(_tiny_config())
    checkpointed = AutoencoderKL(_tiny_config(gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    image = torch.randn(1, 3, 16, 16)
    for model in (plain, checkpointed):
        reconstruction, posterior = model(image, sample_posterior=False)
        (reconstruction.square().mean() + posterior.kl().mean()).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
