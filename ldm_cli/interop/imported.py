"""What `ldm convert` reads out of a foreign source, part by part, before anything is written —
and the Stable Diffusion constants the import and export directions share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from ldm_cli.autoencoder.model import AutoencoderConfig
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.text import TextEncoder, TextEncoderConfig
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.interop.single_file import StateDict

Log = Callable[[str], None]

SD_LATENT_SCALE = 0.18215  # std normaliser of SD's kl-f8 VAE latents: a property of that VAE, stored per bundle
SD1_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # SD v1's frozen text tower (CLIP ViT-L/14, width 768)
SD1_TEXT_WIDTH = 768
SD1_RESOLUTION = 512
METADATA_KEY = "ldm_model"  # ldm's own single files carry their configs here (export.py), read back exactly


@dataclass
class ImportOptions:
    prediction_type: Optional[str] = None  # overrides the source's; else the source's, else epsilon
    use_ema: bool = True  # the EMA U-Net of an original SD file, when it has one
    text_encoder: Optional[str] = None  # hub id or folder: the tokenizer, or the whole encoder when the source has none
    resolution: Optional[int] = None


@dataclass
class ImportedAutoencoder:
    weights: StateDict  # diffusers names
    config: AutoencoderConfig
    latent_scale: float
    latent_shift: float
    resolution: int


@dataclass
class ImportedText:
    config: TextEncoderConfig
    encoder: Optional[TextEncoder]  # loaded from a complete folder, to be bundled; None: a hub id, referenced
    origin: str
    parameters: int = 0


@dataclass
class ImportedModel:
    unet_weights: StateDict  # diffusers names
    unet_config: UNetConfig
    autoencoder: ImportedAutoencoder
    schedule: ScheduleConfig
    text: ImportedText
    source: dict[str, Any] = field(default_factory=dict)
    schedule_origin: str = ""
