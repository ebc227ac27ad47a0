"""`ldm convert --merge-lora`: a new latent-diffusion bundle with LoRAs baked into its weights."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from ldm_cli.adapters.files import LoraSpec
from ldm_cli.adapters.layers import TEXT_ENCODER
from ldm_cli.adapters.merge import merge_loras
from ldm_cli.adapters.prompts import lora_metadata, read_loras
from ldm_cli.adapters.targets import ModelTargets
from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.bundle import Bundle, load_bundle
from ldm_cli.config import from_dict
from ldm_cli.diffusion.load import text_encoder_config, write_latent_diffusion_bundle
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.text import load_text_encoder, save_text_encoder
from ldm_cli.diffusion.unet_config import UNetConfig

# what write_latent_diffusion_bundle and write_bundle set themselves
_WRITTEN_KEYS = {"kind", "ldm_version", "files", "hashes", "content_hash", "unet", "schedule", "text_encoder",
                 "text_encoder_bundled", "autoencoder", "latent_scale", "latent_shift", "latent_channels", "resolution"}


def bake_loras(source: str | Path, specs: list[LoraSpec], out: Path) -> Bundle:
    """Merge every LoRA (checked against the model before anything is written) into a copy of `source`."""
    applied = read_loras(specs)
    bundle = load_bundle(source, kind="latent-diffusion")
    weights = bundle.tensors("unet")
    text_config = text_encoder_config(bundle)
    text_encoder = load_text_encoder(text_config)
    merge_loras(weights, text_encoder.model, applied)
    targets = ModelTargets.of(weights, text_encoder.model)
    touches_text = any(name.startswith(TEXT_ENCODER + ".") for lora, _ in applied for name in targets.resolve(lora))
    autoencoder = load_autoencoder(bundle.path / bundle.meta["autoencoder"]["path"]).bundle
    extra = {key: value for key, value in bundle.meta.items() if key not in _WRITTEN_KEYS}
    extra["merged_loras"] = [*extra.get("merged_loras", []), *lora_metadata(applied)]
    with tempfile.TemporaryDirectory(prefix="ldm-merge-") as scratch:
        if touches_text and not bundle.meta.get("text_encoder_bundled"):
            # a hub text encoder with merged weights is a new one: it travels in the bundle
            text_config = replace(text_config, pretrained=str(save_text_encoder(text_encoder, Path(scratch) / "text_encoder")))
        return write_latent_diffusion_bundle(
            Path(out), weights, from_dict(bundle.meta["unet"], UNetConfig), from_dict(bundle.meta["schedule"], ScheduleConfig),
            text_config, text_encoder, autoencoder, extra,
        )
