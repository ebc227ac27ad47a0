"""Imported weights checked against the ldm model that will run them — every key and shape — and
the parts checked against each other, so that nothing is written that would fail to load."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.diffusion.unet import UNet
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.errors import IncompatibleError, UsageError
from ldm_cli.interop.imported import ImportedAutoencoder, ImportedModel
from ldm_cli.interop.sd_keys import check_keys
from ldm_cli.interop.single_file import StateDict


def check_weights(weights: StateDict, build: Callable[[], torch.nn.Module], what: str) -> None:
    """`weights` must be exactly the state dict of the model `build` makes (keys and shapes)."""
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = build().state_dict()
    # position_ids (transformers' CLIP) is a buffer the model rebuilds itself, not a weight
    check_keys(weights, {k: v for k, v in expected.items() if not k.endswith("position_ids")}, what)


def check_unet_weights(weights: StateDict, config: UNetConfig) -> None:
    check_weights(weights, lambda: UNet(config), "U-Net")


def check_autoencoder_weights(weights: StateDict, config: AutoencoderConfig) -> None:
    check_weights(weights, lambda: AutoencoderKL(config), "VAE")


def check_autoencoder(autoencoder: ImportedAutoencoder) -> None:
    check_autoencoder_weights(autoencoder.weights, autoencoder.config)
    factor = autoencoder.config.downsampling_factor
    if autoencoder.resolution % factor:
        raise UsageError(f"--resolution {autoencoder.resolution} is not a multiple of the autoencoder's factor {factor}")


def check_unet_fits(model: ImportedModel) -> None:
    """The U-Net's weights, and that it reads what the VAE and the text encoder make."""
    unet, text = model.unet_config, model.text
    check_unet_weights(model.unet_weights, unet)
    latent_channels = model.autoencoder.config.latent_channels
    # an inpainting U-Net reads latent + mask + masked-image latent: 2 · latent + 1 channels
    if unet.in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise IncompatibleError(
            f"the U-Net reads {unet.in_channels} channels but the VAE makes {latent_channels}-channel latents "
            f"(an inpainting U-Net reads {2 * latent_channels + 1})"
        )
    if text.encoder is not None and text.encoder.width != unet.cross_attention_dim:
        raise IncompatibleError(
            f"the text encoder ({text.origin}) is {text.encoder.width} wide but the U-Net's cross-attention reads "
            f"{unet.cross_attention_dim}; pass the matching one with --text-encoder"
        )
