"""A tiny latent-diffusion bundle with random weights (no training), for sampling tests.

    from tests.sampling.helpers import write_tiny_latent_diffusion
    bundle_dir = write_tiny_latent_diffusion(tmp_path / "model")

Autoencoder: 2 levels (downsampling factor 2), 4 latent channels, resolution 16 → 8x8 latents.
U-Net: 2 levels with cross-attention, width 32 context from a tiny random CLIP text encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import load_bundle, write_bundle
from ldm_cli.config import to_dict
from ldm_cli.diffusion.load import write_latent_diffusion_bundle
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder
from ldm_cli.diffusion.unet import UNet
from ldm_cli.diffusion.unet_config import UNetConfig

TINY_RESOLUTION = 16
TINY_LATENT_SCALE = 0.5


def tiny_autoencoder_config() -> AutoencoderConfig:
    return AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4)


def tiny_unet_config() -> UNetConfig:
    return UNetConfig(
        block_out_channels=[32, 64],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
    )


def _randomized(model: torch.nn.Module, generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """Replace every tensor with small random values: zero-initialised output layers would otherwise
    make the U-Net predict 0 everywhere and hide mistakes in guidance or conditioning."""
    weights = {}
    for name, value in model.state_dict().items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight")):
            weights[name] = 1 + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            std = scale / value[0].numel() ** 0.5 if value.ndim > 1 else 0.1 * scale  # ~unit activations
            weights[name] = torch.randn(value.shape, generator=generator) * std
    return weights


def write_tiny_latent_diffusion(
    directory: str | Path, seed: int = 0, schedule: ScheduleConfig | None = None, resolution: int = TINY_RESOLUTION
) -> Path:
    """Write a complete random latent-diffusion bundle into `directory` and return its path."""
    directory = Path(directory)
    generator = torch.Generator().manual_seed(seed)
    autoencoder_config = tiny_autoencoder_config()
    autoencoder = AutoencoderKL(autoencoder_config)
    autoencoder_bundle = write_bundle(
        directory.parent / f".{directory.name}-autoencoder",
        "autoencoder",
        {"autoencoder": _randomized(autoencoder, generator, 1.0)},
        {"autoencoder": to_dict(autoencoder_config), "latent_scale": TINY_LATENT_SCALE, "latent_shift": 0.0, "resolution": resolution},
    )
    unet_config = tiny_unet_config()
    unet_weights = _randomized(UNet(unet_config), generator, 1.0)
    text_config = TextEncoderConfig(tiny=True, max_length=16)
    text_encoder = load_text_encoder(text_config)
    bundle = write_latent_diffusion_bundle(
        directory, unet_weights, unet_config, schedule or ScheduleConfig(), text_config, text_encoder, autoencoder_bundle
    )
    return bundle.path


def pixels(path: Path) -> np.ndarray:
    """An image file's RGB pixels."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_autoencoder_variant(source: str | Path, directory: str | Path, change: str) -> Path:
    """A copy of an autoencoder bundle with its decoder's or its encoder's weights changed: a stand-in
    for a decoder-only fine-tune ("decoder") or an unrelated autoencoder ("encoder")."""
    bundle = load_bundle(source, kind="autoencoder")
    weights = {name: value.clone() for name, value in bundle.tensors("autoencoder").items()}
    for name in weights:
        if name.startswith(f"{change}."):
            weights[name] += 0.05 * torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(len(name)))
    meta = {key: value for key, value in bundle.meta.items() if key in ("autoencoder", "latent_scale", "latent_shift", "resolution")}
    return write_bundle(directory, "autoencoder", {"autoencoder": weights}, meta).path
