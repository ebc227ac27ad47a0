"""Imported parts → ldm bundles: an autoencoder bundle, and a latent-diffusion bundle that links it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ldm_cli.autoencoder.load import latent_space_hash
from ldm_cli.bundle import Bundle, write_bundle
from ldm_cli.config import to_dict
from ldm_cli.diffusion.load import BUNDLED_TEXT_ENCODER, write_latent_diffusion_bundle
from ldm_cli.interop.imported import ImportedAutoencoder, ImportedModel


def write_autoencoder(autoencoder: ImportedAutoencoder, directory: Path, source: dict[str, Any]) -> Bundle:
    meta = {
        "autoencoder": to_dict(autoencoder.config),
        "latent_scale": autoencoder.latent_scale,
        "latent_shift": autoencoder.latent_shift,
        "latent_space_hash": latent_space_hash(autoencoder.weights, autoencoder.latent_scale, autoencoder.latent_shift),
        "resolution": autoencoder.resolution,
        "source": source,
    }
    return write_bundle(directory, "autoencoder", {"autoencoder": autoencoder.weights}, meta)


def write_latent_diffusion(model: ImportedModel, out: Path, scratch: Path) -> Bundle:
    """The autoencoder is written to `scratch` first; write_latent_diffusion_bundle copies it into `out`."""
    source = {**model.source, "text_encoder": model.text.origin}
    autoencoder = write_autoencoder(model.autoencoder, scratch / "autoencoder", source)
    extra: dict[str, Any] = {"source": source}
    if model.text.encoder is not None:
        # bundled: record the folder's name inside the bundle, not the scratch folder it was built in
        extra["text_encoder"] = to_dict(dataclasses.replace(model.text.config, pretrained=BUNDLED_TEXT_ENCODER))
    return write_latent_diffusion_bundle(
        out, model.unet_weights, model.unet_config, model.schedule, model.text.config, model.text.encoder,
        autoencoder, extra=extra,
    )
