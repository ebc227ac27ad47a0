"""Foreign configs and weights → ldm's config dataclasses, refusing what ldm's models cannot run.

What the source does not say gets Stable Diffusion v1's value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, TypeVar

from ldm_cli.autoencoder.model import AutoencoderConfig
from ldm_cli.config import from_dict
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.errors import BundleError, ConfigError, IncompatibleError
from ldm_cli.interop.detect import detect_prediction_type, detect_vae_config
from ldm_cli.interop.imported import SD1_RESOLUTION, SD_LATENT_SCALE, ImportedAutoencoder, Log
from ldm_cli.interop.single_file import StateDict

# diffusers' beta_schedule names → ldm's
BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}

Config = TypeVar("Config")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{path} is not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def refuse_options(raw: Mapping[str, Any], off: Mapping[str, Any], what: str) -> None:
    """Refuse a config that turns on an option ldm's models do not implement (`off`: name → its "off" value)."""
    for name, value_off in off.items():
        value = raw.get(name, value_off)
        values = value if isinstance(value, list) else [value]
        if any(v != value_off for v in values):
            raise IncompatibleError(
                f"{what} sets {name}={value!r}, which ldm's models do not implement "
                "(they run Stable Diffusion v1/v2 architectures)"
            )


def checked(build: Callable[[], Config], what: str) -> Config:
    """A config ldm rejects is the source's incompatibility, not the user's config error."""
    try:
        return build()
    except ConfigError as error:
        raise IncompatibleError(f"this {what} is not one ldm can run: {error}") from error


def unet_config(fields: dict[str, Any]) -> UNetConfig:
    return checked(lambda: from_dict(fields, UNetConfig), "U-Net")


def norm_groups(channels: list[int]) -> int:
    """GroupNorm groups are not in the weights: SD's 32, or the largest count all widths allow (tiny models)."""
    common = math.gcd(*channels)
    return max(groups for groups in range(1, 33) if common % groups == 0)


def autoencoder_from_weights(weights: StateDict, hints: dict, resolution: Optional[int]) -> ImportedAutoencoder:
    """A VAE in diffusers names, its config from ldm's metadata or read off the weights."""
    if hints.get("autoencoder"):
        config = checked(lambda: from_dict(hints["autoencoder"], AutoencoderConfig), "autoencoder")
    else:
        detected = detect_vae_config(weights)
        if not (detected["use_quant_conv"] and detected["use_post_quant_conv"]):
            raise IncompatibleError("the VAE has no quant_conv/post_quant_conv; ldm's autoencoder needs both (SD's kl-f8 layout)")
        config = AutoencoderConfig(
            in_channels=detected["in_channels"],
            out_channels=detected["out_channels"],
            latent_channels=detected["latent_channels"],
            block_out_channels=detected["block_out_channels"],
            layers_per_block=detected["layers_per_block"],
            norm_num_groups=norm_groups(detected["block_out_channels"]),
            mid_block_add_attention=detected["mid_block_add_attention"],
        )
    return ImportedAutoencoder(
        weights=weights,
        config=config,
        latent_scale=float(hints.get("latent_scale", SD_LATENT_SCALE)),
        latent_shift=float(hints.get("latent_shift", 0.0)),
        resolution=int(resolution or hints.get("resolution") or SD1_RESOLUTION),
    )


def schedule_config(
    raw: Mapping[str, Any], origin: str, override: Optional[str], log: Log
) -> tuple[ScheduleConfig, str]:
    """The training schedule (diffusers' scheduler names in `raw`) and a note on where it, and the
    prediction type, came from."""
    beta_schedule = raw.get("beta_schedule", "scaled_linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise IncompatibleError(f"beta_schedule {beta_schedule!r} is not supported; ldm has {', '.join(BETA_SCHEDULES)}")
    source_type = raw.get("prediction_type")
    prediction_type = detect_prediction_type(override=override or source_type)
    defaults = ScheduleConfig()
    config = checked(
        lambda: ScheduleConfig(
            num_train_timesteps=int(raw.get("num_train_timesteps", defaults.num_train_timesteps)),
            beta_schedule=BETA_SCHEDULES[beta_schedule],
            beta_start=float(raw.get("beta_start", defaults.beta_start)),
            beta_end=float(raw.get("beta_end", defaults.beta_end)),
            prediction_type=prediction_type,
            rescale_betas_zero_snr=bool(raw.get("rescale_betas_zero_snr", False)),
        ),
        "schedule",
    )
    if override and source_type and override != source_type:
        log(f"note: prediction type {override} (--prediction-type) replaces the source's {source_type}")
    how = "--prediction-type" if override else ("the source's" if source_type else "assumed: pass --prediction-type if wrong")
    return config, f"from {origin}; prediction type {how}"
