"""An original (CompVis) Stable Diffusion single file → an ImportedModel.

Such files carry no configs: the U-Net's block structure, the VAE and CLIP architectures and the
schedule are read off the weights (and SD's saved betas), unless ldm wrote its own configs into the
file's metadata (`hints`, see export.py), which are then used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm_cli.diffusion.schedule import ScheduleConfig, make_betas
from ldm_cli.errors import BundleError, ConfigError, IncompatibleError
from ldm_cli.interop.configs import autoencoder_from_weights, norm_groups, schedule_config, unet_config
from ldm_cli.interop.detect import block_indices, detect_unet_config
from ldm_cli.interop.imported import ImportedModel, ImportOptions, Log
from ldm_cli.interop.sd_keys import (
    EMA_PREFIX,
    extract_ema_unet,
    split_sd_checkpoint,
    unet_sd_to_diffusers,
    vae_sd_to_diffusers,
)
from ldm_cli.interop.single_file import StateDict
from ldm_cli.interop.text_encoder import referenced_text, text_from_sd_checkpoint

EMA_COUNTERS = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")  # bookkeeping, not EMA weights
# schedule tables the original LatentDiffusion class saves next to the weights; rebuilt from the config
_SD_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
}


def has_ema_weights(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(EMA_PREFIX) and key not in EMA_COUNTERS for key in tensors)


def from_sd_single_file(
    tensors: StateDict, hints: dict, options: ImportOptions, scratch: Path, log: Log, source: Path
) -> ImportedModel:
    parts = split_sd_checkpoint(tensors)
    sd_unet, ema = _choose_unet_weights(tensors, parts["unet"], options.use_ema, log)
    unet_weights = unet_sd_to_diffusers(sd_unet, sd_unet_layout(sd_unet))
    if not parts["vae"]:
        raise BundleError(f"{source} has U-Net weights but no first_stage_model.* (VAE) weights; is it a whole SD checkpoint?")
    autoencoder = autoencoder_from_weights(vae_sd_to_diffusers(parts["vae"]), hints, options.resolution)

    if hints.get("unet"):
        unet_fields = dict(hints["unet"])
    else:
        unet_fields = detect_unet_config(unet_weights)
        unet_fields["norm_num_groups"] = norm_groups(unet_fields["block_out_channels"])
    unet_fields["sample_size"] = autoencoder.resolution // autoencoder.config.downsampling_factor
    unet = unet_config(unet_fields)

    if hints.get("schedule"):
        raw_schedule, origin = dict(hints["schedule"]), "ldm metadata"
    else:
        raw_schedule = _schedule_from_betas(parts["other"].get("betas"))
        origin = "the file's betas" if raw_schedule else "SD v1 defaults"
    schedule, schedule_origin = schedule_config(raw_schedule, origin, options.prediction_type, log)

    unknown = sorted(k for k in parts["other"] if k not in _SD_BUFFERS and not k.startswith(EMA_PREFIX))
    other_text = [k for k in unknown if k.startswith("cond_stage_model.")]
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        log(f"ignored {len(unknown)} tensors outside the U-Net/VAE/CLIP parts: {shown}")

    if parts["text_encoder"]:
        text = text_from_sd_checkpoint(
            parts["text_encoder"], hints.get("text_encoder_hf"), options.text_encoder, scratch, source
        )
    elif other_text and options.text_encoder is None:
        raise IncompatibleError(
            f"{source} holds a text encoder in a layout ldm cannot read ({other_text[0]}, e.g. SD 2's OpenCLIP); "
            "pass --text-encoder <hub id or folder of the matching CLIP text model in transformers format>"
        )
    else:
        text = referenced_text(options.text_encoder, unet.cross_attention_dim, scratch, log)
    source_record = {"path": str(source.resolve()), "format": "sd-single-file", "ema": ema}
    return ImportedModel(unet_weights, unet, autoencoder, schedule, text, source_record, schedule_origin)


def original_vae_weights(tensors: StateDict) -> StateDict:
    """A standalone VAE in the original layout, with or without first_stage_model., in diffusers names."""
    vae = split_sd_checkpoint(tensors)["vae"] or {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    return vae_sd_to_diffusers(vae)


def _choose_unet_weights(tensors: StateDict, unet: StateDict, use_ema: bool, log: Log) -> tuple[StateDict, str]:
    has_ema = has_ema_weights(tensors)
    if has_ema and use_ema:
        log("EMA: present in the file, used (--no-ema for the raw trained weights)")
        return extract_ema_unet(tensors), "used"
    log("EMA: present in the file, not used (--no-ema)" if has_ema else "EMA: not in the file (weights used as stored)")
    if not unet:
        raise BundleError("the file has no model.diffusion_model.* U-Net weights (only EMA ones); convert it with --ema")
    return unet, "present, not used" if has_ema else "absent"


def sd_unet_layout(sd_unet: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The block structure of an original-SD U-Net, read off its keys: what `unet_sd_to_diffusers`
    needs before the full config can be detected from diffusers names."""
    keys = set(sd_unet)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    blocks = block_indices(keys, "input_blocks.")
    if not blocks or not has("input_blocks.0.0."):
        raise BundleError("the U-Net weights have no input_blocks.0.0 (conv_in); is this an SD v1/v2 checkpoint?")
    layers, attention = [0], [False]
    for block in blocks[1:]:
        if f"input_blocks.{block}.0.op.weight" in keys:  # a downsampler closes the level
            layers.append(0)
            attention.append(False)
            continue
        layers[-1] += 1
        attention[-1] |= has(f"input_blocks.{block}.1.")
    if min(layers) == 0:
        raise BundleError("the U-Net's input_blocks do not form SD's levels (a level without resnets)")
    levels = len(layers)
    up_attention, block = [], 0
    for up in range(levels):
        count = layers[levels - 1 - up] + 1
        up_attention.append(any(has(f"output_blocks.{b}.1.proj_in.") for b in range(block, block + count)))
        block += count
    mid = "UNetMidBlock2DCrossAttn" if has("middle_block.1.proj_in.") else "UNetMidBlock2D"
    return {
        "block_out_channels": [None] * levels,  # the key map needs only their number
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "mid_block_type": mid,
    }


def _schedule_from_betas(betas: torch.Tensor | None) -> dict[str, Any]:
    """Read (num_train_timesteps, beta schedule, beta_start, beta_end) off SD's saved `betas` table."""
    if betas is None or betas.ndim != 1 or len(betas) < 2:
        return {}
    betas = betas.double()
    start, end = float(f"{betas[0].item():.6g}"), float(f"{betas[-1].item():.6g}")
    for name in ("scaled_linear", "linear"):
        try:
            candidate = ScheduleConfig(num_train_timesteps=len(betas), beta_schedule=name, beta_start=start, beta_end=end)
        except ConfigError:
            return {}
        if torch.allclose(make_betas(candidate).double(), betas, rtol=1e-4, atol=1e-8):
            return {"num_train_timesteps": len(betas), "beta_schedule": name, "beta_start": start, "beta_end": end}
    return {}
