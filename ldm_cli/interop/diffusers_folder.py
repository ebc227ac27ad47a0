"""A diffusers folder → an ImportedModel (a StableDiffusionPipeline folder) or an ImportedAutoencoder
(an AutoencoderKL folder). Configs are read as diffusers wrote them; options ldm's models do not
implement are refused rather than silently dropped."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ldm_cli.autoencoder.model import AutoencoderConfig
from ldm_cli.config import from_dict
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.errors import IncompatibleError, MissingWeightsError
from ldm_cli.interop.configs import BETA_SCHEDULES, checked, read_json, refuse_options, schedule_config, unet_config
from ldm_cli.interop.imported import SD1_RESOLUTION, SD_LATENT_SCALE, ImportedAutoencoder, ImportedModel, ImportOptions, Log
from ldm_cli.interop.single_file import read_folder_weights
from ldm_cli.interop.text_encoder import referenced_text, text_from_diffusers_folder

# diffusers UNet2DConditionModel options our U-Net does not implement, with the value meaning "off"
_UNET_OPTIONS_OFF = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_embedding_type": "positional", "time_cond_proj_dim": None, "timestep_post_act": None,
    "time_embedding_dim": None, "time_embedding_act_fn": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "cross_attention_norm": None, "attention_type": "default",
    "num_attention_heads": None, "reverse_transformer_layers_per_block": None, "class_embeddings_concat": False,
}
_VAE_OPTIONS_OFF = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True}


def from_diffusers_pipeline(folder: Path, options: ImportOptions, scratch: Path, log: Log) -> ImportedModel:
    for part in ("unet", "vae"):
        if not (folder / part / "config.json").is_file():
            raise MissingWeightsError(f"{folder} has no {part}/config.json; is the download complete?")
    if options.use_ema is False:
        log("note: --no-ema has no effect on a diffusers folder (it holds one U-Net)")
    unet_raw = read_json(folder / "unet" / "config.json")
    refuse_options(unet_raw, _UNET_OPTIONS_OFF, f"{folder / 'unet'}")
    vae_raw = read_json(folder / "vae" / "config.json")
    factor = 2 ** (len(vae_raw.get("block_out_channels", [0])) - 1)
    resolution = options.resolution or (int(unet_raw["sample_size"]) * factor if "sample_size" in unet_raw else None)
    autoencoder = diffusers_vae(folder / "vae", resolution, log)

    unet_fields = {f.name: unet_raw[f.name] for f in dataclasses.fields(UNetConfig) if f.name in unet_raw}
    unet_fields["sample_size"] = autoencoder.resolution // factor
    unet = unet_config(unet_fields)
    unet_weights = read_folder_weights(folder / "unet", "diffusion_pytorch_model")

    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        raw_schedule = read_json(scheduler_config)
        if raw_schedule.get("trained_betas") is not None:
            raise IncompatibleError(
                f"{scheduler_config} lists trained_betas; ldm supports {', '.join(BETA_SCHEDULES)} schedules"
            )
        origin = f"scheduler/ ({raw_schedule.get('_class_name', 'scheduler')})"
    else:
        raw_schedule, origin = {}, "SD v1 defaults (no scheduler/scheduler_config.json)"
    schedule, schedule_origin = schedule_config(raw_schedule, origin, options.prediction_type, log)

    if (folder / "text_encoder" / "config.json").is_file():
        text = text_from_diffusers_folder(folder, options.text_encoder, scratch)
    else:
        text = referenced_text(options.text_encoder, unet.cross_attention_dim, scratch, log)
    source_record = {"path": str(folder.resolve()), "format": "diffusers", "ema": "n/a"}
    return ImportedModel(unet_weights, unet, autoencoder, schedule, text, source_record, schedule_origin)


def diffusers_vae(folder: Path, resolution: Optional[int], log: Log) -> ImportedAutoencoder:
    """An AutoencoderKL folder (config.json and weights), alone or as a pipeline's vae/."""
    raw = read_json(folder / "config.json")
    refuse_options(raw, _VAE_OPTIONS_OFF, str(folder))
    levels = len(raw.get("block_out_channels", []))
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(kind != block for kind in raw.get(name, [block] * levels)):
            raise IncompatibleError(f"{folder}: {name}={raw[name]} — ldm's autoencoder has {block} blocks only")
    if raw.get("latents_mean") is not None or raw.get("latents_std") is not None:
        log("note: the VAE config's latents_mean/latents_std are ignored (as StableDiffusionPipeline does)")
    names = {f.name for f in dataclasses.fields(AutoencoderConfig)} - {"gradient_checkpointing"}
    fields = {name: raw[name] for name in names if name in raw}
    config = checked(lambda: from_dict(fields, AutoencoderConfig), "autoencoder")
    weights = read_folder_weights(folder, "diffusion_pytorch_model")
    return ImportedAutoencoder(
        weights=weights,
        config=config,
        latent_scale=float(raw.get("scaling_factor") or SD_LATENT_SCALE),
        latent_shift=float(raw.get("shift_factor") or 0.0),
        resolution=int(resolution or raw.get("sample_size") or SD1_RESOLUTION),
    )
