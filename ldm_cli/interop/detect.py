"""Read a model's architecture off its weights (diffusers names), for importing checkpoints
that come without a config. Returns plain dicts keyed with diffusers' config names.

What weights cannot tell — norm_num_groups, attention heads, sample_size, prediction type —
gets the Stable Diffusion v1 value, and the caller may override it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from ldm_cli.errors import BundleError, UsageError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SD1_ATTENTION_HEADS = 8  # SD v1 uses 8 heads at every width (diffusers calls it attention_head_dim)
SD2_HEAD_CHANNELS = 64  # SD v2 (linear projections) uses 64 channels per head instead


def block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers that follow `prefix` in `keys` (e.g. the resnets of a block)."""
    return sorted({int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def _one_or_list(values: list[int]) -> int | list[int]:
    """diffusers' convention: an int when every level agrees, else one value per level."""
    return values[0] if len(set(values)) == 1 else values


def _require(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise BundleError(f"{what} weights have no {key!r} — are these diffusers-layout {what} weights?")
    return sd[key]


def detect_unet_config(
    diffusers_unet_sd: Mapping[str, Tensor], attention_head_dim: int | list[int] | None = None
) -> dict[str, Any]:
    """Infer a UNet2DConditionModel config from its state dict (diffusers names, no prefix).

    `attention_head_dim` (diffusers' name; the head count for SD v1) cannot be read off the
    weights: give it, or get 8 (SD v1) — or channels // 64 per level with linear projections (SD v2).
    """
    keys = list(diffusers_unet_sd)
    what = "U-Net"
    conv_in = _require(diffusers_unet_sd, "conv_in.weight", what)
    conv_out = _require(diffusers_unet_sd, "conv_out.weight", what)

    levels = block_indices(keys, "down_blocks.")
    if not levels:
        raise BundleError("U-Net weights have no down_blocks.* — are these diffusers-layout U-Net weights?")
    block_out_channels = [
        int(_require(diffusers_unet_sd, f"down_blocks.{level}.resnets.0.conv1.weight", what).shape[0])
        for level in levels
    ]
    layers_per_block = [len(block_indices(keys, f"down_blocks.{level}.resnets.")) for level in levels]

    down_attention = [bool(block_indices(keys, f"down_blocks.{level}.attentions.")) for level in levels]
    up_attention = [bool(block_indices(keys, f"up_blocks.{level}.attentions.")) for level in levels]
    mid_block_type = None
    if any(k.startswith("mid_block.attentions.") for k in keys):
        mid_block_type = "UNetMidBlock2DCrossAttn"
    elif any(k.startswith("mid_block.resnets.") for k in keys):
        mid_block_type = "UNetMidBlock2D"

    # transformer depth per down level; levels without attention do not constrain it
    depths = [len(block_indices(keys, f"down_blocks.{level}.attentions.0.transformer_blocks.")) for level in levels]
    attention_depths = {depth for depth in depths if depth}
    if len(attention_depths) <= 1:
        transformer_layers: int | list[int] = attention_depths.pop() if attention_depths else 1
    else:
        transformer_layers = [depth or 1 for depth in depths]
    proj_in = next((diffusers_unet_sd[k] for k in keys if k.endswith("proj_in.weight")), None)
    use_linear_projection = proj_in is not None and proj_in.ndim == 2
    # attn2 is the cross-attention: its key projection reads the text embedding
    to_k = next((diffusers_unet_sd[k] for k in keys if k.endswith("attn2.to_k.weight")), None)
    cross_attention_dim = int(to_k.shape[1]) if to_k is not None else None

    if attention_head_dim is None:
        if use_linear_projection:
            attention_head_dim = [channels // SD2_HEAD_CHANNELS for channels in block_out_channels]
        else:
            attention_head_dim = SD1_ATTENTION_HEADS

    return {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "block_out_channels": block_out_channels,
        "layers_per_block": _one_or_list(layers_per_block),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention],
        "mid_block_type": mid_block_type,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention],
        "transformer_layers_per_block": transformer_layers,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": use_linear_projection,
        "attention_head_dim": attention_head_dim,
    }


def detect_vae_config(diffusers_vae_sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Infer an AutoencoderKL config from its state dict (diffusers names, no prefix)."""
    keys = list(diffusers_vae_sd)
    what = "VAE"
    levels = block_indices(keys, "encoder.down_blocks.")
    if not levels:
        raise BundleError("VAE weights have no encoder.down_blocks.* — are these diffusers-layout VAE weights?")
    block_out_channels = [
        int(_require(diffusers_vae_sd, f"encoder.down_blocks.{level}.resnets.0.conv1.weight", what).shape[0])
        for level in levels
    ]
    decoder_in = _require(diffusers_vae_sd, "decoder.conv_in.weight", what)
    return {
        "in_channels": int(_require(diffusers_vae_sd, "encoder.conv_in.weight", what).shape[1]),
        "out_channels": int(_require(diffusers_vae_sd, "decoder.conv_out.weight", what).shape[0]),
        "block_out_channels": block_out_channels,
        "layers_per_block": len(block_indices(keys, "encoder.down_blocks.0.resnets.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "latent_channels": int(decoder_in.shape[1]),
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in keys),
        "use_quant_conv": "quant_conv.weight" in diffusers_vae_sd,
        "use_post_quant_conv": "post_quant_conv.weight" in diffusers_vae_sd,
    }


def detect_prediction_type(unet_config: Mapping[str, Any] | None = None, override: str | None = None) -> str:
    """What the U-Net predicts. Weights do not say, so: the user's `override` if given, else
    "epsilon" — right for SD v1 and SD 2 base; SD 2.x 768-v checkpoints need override="v_prediction".

    `unet_config` (e.g. from `detect_unet_config`) is accepted so a better rule can use it later.
    """
    del unet_config  # no weight-based rule is reliable (SD 2 base and 768-v share one architecture)
    if override is None:
        return "epsilon"
    if override not in PREDICTION_TYPES:
        raise UsageError(f"unknown prediction type {override!r}; use one of {', '.join(PREDICTION_TYPES)}")
    return override
