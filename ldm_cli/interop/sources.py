"""What kind of source `ldm convert` was given, read by the reader for that kind:

    diffusers pipeline folder   → diffusers_folder.from_diffusers_pipeline
    diffusers AutoencoderKL folder → diffusers_folder.diffusers_vae
    original SD single file     → sd_checkpoint.from_sd_single_file
    standalone VAE file (either layout) → configs.autoencoder_from_weights
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm_cli.bundle import BUNDLE_JSON
from ldm_cli.errors import BundleError, UsageError
from ldm_cli.interop.configs import autoencoder_from_weights, read_json
from ldm_cli.interop.describe import main_dtype
from ldm_cli.interop.diffusers_folder import diffusers_vae, from_diffusers_pipeline
from ldm_cli.interop.imported import METADATA_KEY, ImportedAutoencoder, ImportedModel, ImportOptions, Log
from ldm_cli.interop.sd_checkpoint import from_sd_single_file, has_ema_weights, original_vae_weights
from ldm_cli.interop.sd_keys import UNET_PREFIX, VAE_PREFIX
from ldm_cli.interop.single_file import read_checkpoint


def already_a_bundle(source: Path) -> UsageError:
    return UsageError(f"{source} is already an ldm bundle; export it with --to diffusers or --to sd-single-file")


def read_source(source: Path, options: ImportOptions, scratch: Path, log: Log) -> ImportedModel | ImportedAutoencoder:
    if source.is_dir():
        if (source / BUNDLE_JSON).is_file():
            raise already_a_bundle(source)
        if (source / "model_index.json").is_file():
            log(f"source: {source} (diffusers pipeline folder)")
            return from_diffusers_pipeline(source, options, scratch, log)
        config = source / "config.json"
        if config.is_file() and read_json(config).get("_class_name") == "AutoencoderKL":
            log(f"source: {source} (diffusers AutoencoderKL folder)")
            return diffusers_vae(source, options.resolution, log)
        raise BundleError(
            f"{source} is not a diffusers pipeline (no model_index.json), a diffusers VAE folder (no AutoencoderKL "
            "config.json) or an ldm bundle; pass the pipeline's top folder or a single .safetensors/.ckpt file"
        )
    tensors, metadata = read_checkpoint(source)
    hints = _ldm_hints(metadata)
    layout = _classify(tensors, source)
    dtype = main_dtype(tensors)
    if layout == "sd":
        log(f"source: {source} (original Stable Diffusion layout, {len(tensors)} tensors, {dtype})")
        return from_sd_single_file(tensors, hints, options, scratch, log, source)
    log(f"source: {source} (standalone VAE, {layout} layout, {dtype})")
    if options.prediction_type or options.text_encoder:
        log("note: --prediction-type and --text-encoder do not apply to a VAE; ignored")
    weights = original_vae_weights(tensors) if layout == "original" else tensors
    return autoencoder_from_weights(weights, hints, options.resolution)


def _classify(tensors: Mapping[str, torch.Tensor], source: Path) -> str:
    """'sd' (a whole original checkpoint), 'original' / 'diffusers' (a VAE alone, in that layout)."""
    keys = list(tensors)
    if any(key.startswith(UNET_PREFIX) for key in keys) or has_ema_weights(tensors):
        return "sd"
    if any(key.startswith((VAE_PREFIX + "encoder.", "encoder.down.")) for key in keys):
        return "original"
    if any(key.startswith("encoder.down_blocks.") for key in keys):
        return "diffusers"
    if "conv_in.weight" in tensors and any(key.startswith("down_blocks.") for key in keys):
        raise UsageError(
            f"{source} is a diffusers U-Net alone; convert the whole pipeline folder (model_index.json, unet/, vae/, ...)"
        )
    raise BundleError(
        f"{source} does not look like a Stable Diffusion checkpoint or VAE (no model.diffusion_model.*, "
        f"first_stage_model.* or encoder.* keys; it has e.g. {', '.join(keys[:3])})"
    )


def _ldm_hints(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The configs ldm wrote into its own single files (export.py); {} for anyone else's."""
    try:
        hints = json.loads(metadata.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return {}
    return hints if isinstance(hints, dict) else {}
