"""Weight-name maps between an original Stable Diffusion (CompVis) checkpoint and diffusers' layout.

An original SD v1 file is one flat state dict:

    model.diffusion_model.*         U-Net        (input_blocks / middle_block / output_blocks)
    first_stage_model.*             kl-f8 VAE    (encoder.down.{i}.block.{j} ...)
    cond_stage_model.transformer.*  CLIP text    (text_model.* of transformers < 5.6)
    model_ema.*                     EMA copy of the U-Net, names with the dots removed
    everything else                 schedule buffers (betas, alphas_cumprod, ...)

Our models use diffusers' parameter names, so these maps are all that import/export needs.
Convention: the component functions take and return *component-local* names — no
`model.diffusion_model.` / `first_stage_model.` / `cond_stage_model.transformer.` prefix.
`split_sd_checkpoint` strips those prefixes and `join_sd_checkpoint` puts them back.

Every map is a pure function: tensors are passed through (no copy), except the VAE mid-block
attention projections, which SD stores as 1x1 convs [C, C, 1, 1] and diffusers as Linear [C, C]
(reshaped views). A key a map cannot place, or a module with no weights at all, raises
`BundleError` — never a silent partial load. Callers then run `check_keys` against the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from torch import Tensor

from ldm_cli.errors import BundleError, IncompatibleError

StateDict = dict[str, Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."
_PART_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

# Sub-module renames inside one block, diffusers name -> SD name. `None` means the block's
# inner names are identical in both layouts (the U-Net transformers: proj_in, transformer_blocks.*).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# the projections SD stores as 1x1 convs and diffusers as Linear
_VAE_SD_PROJECTIONS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
_VAE_DIFFUSERS_PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")

# module prefix in one layout -> (module prefix in the other layout, inner renames or None)
_ModuleTable = dict[str, tuple[str, "dict[str, str] | None"]]


# ----------------------------------------------------------------------------- config access


def _field(config: Any, name: str, default: Any = None) -> Any:
    """Read `name` from a dict-like config (dict, DictConfig, FrozenDict) or any object."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _per_level(value: int | Iterable[int], levels: int, name: str) -> list[int]:
    """diffusers allows an int (same for every level) or one value per level."""
    if isinstance(value, int):
        return [value] * levels
    values = [int(v) for v in value]
    if len(values) != levels:
        raise IncompatibleError(f"{name} has {len(values)} entries but the model has {levels} levels")
    return values


# ----------------------------------------------------------------------------- generic remapping


def _invert(table: _ModuleTable) -> _ModuleTable:
    inverted: _ModuleTable = {}
    for source, (target, renames) in table.items():
        inner = None if renames is None else {new: old for old, new in renames.items()}
        inverted[target] = (source, inner)
    return inverted


def _longest_prefix(parts: list[str], names: Mapping[str, Any]) -> int:
    """Number of leading dotted parts that form the longest key of `names` (0: none)."""
    for cut in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:cut]) in names:
            return cut
    return 0


def _remap(state: Mapping[str, Tensor], table: _ModuleTable, what: str) -> StateDict:
    """Rename every key through `table`; BundleError for keys it cannot place or modules left empty."""
    mapped: StateDict = {}
    unexpected: list[str] = []
    seen_modules: set[str] = set()
    for key, tensor in state.items():
        parts = key.split(".")
        cut = _longest_prefix(parts, table)
        if cut == 0:
            unexpected.append(key)
            continue
        module = ".".join(parts[:cut])
        target, renames = table[module]
        inner = parts[cut:]
        if renames is not None:
            inner_cut = _longest_prefix(inner, renames)
            if inner_cut == 0:
                unexpected.append(key)
                continue
            inner = [renames[".".join(inner[:inner_cut])], *inner[inner_cut:]]
        mapped[f"{target}.{'.'.join(inner)}"] = tensor
        seen_modules.add(module)
    missing = [f"{module}.*" for module in table if module not in seen_modules]
    if missing or unexpected:
        raise BundleError(_mismatch_message(what, missing, unexpected))
    return mapped


def _mismatch_message(
    what: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str] = ()
) -> str:
    def some(names: Sequence[str]) -> str:
        shown = ", ".join(sorted(names)[:4])
        return shown + (", ..." if len(names) > 4 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} with the wrong shape ({some(shapes)})")
    return (
        f"{what} weights do not fit the model: {'; '.join(problems)} — "
        "is it the right file, and does the model config (channels, layers, block types) match it?"
    )


def check_keys(
    mapped: Mapping[str, Tensor], expected_keys: Iterable[str] | Mapping[str, Tensor], what: str
) -> None:
    """Raise BundleError unless `mapped` has exactly `expected_keys` (and, given tensors, their shapes).

    Pass `model.state_dict()` as `expected_keys` to compare shapes too.
    """
    expected = set(expected_keys)
    missing = sorted(expected - mapped.keys())
    unexpected = sorted(mapped.keys() - expected)
    wrong_shape: list[str] = []
    if isinstance(expected_keys, Mapping):
        wrong_shape = [
            f"{key} {tuple(mapped[key].shape)} vs {tuple(expected_keys[key].shape)}"
            for key in sorted(expected & mapped.keys())
            if tuple(mapped[key].shape) != tuple(expected_keys[key].shape)
        ]
    if missing or unexpected or wrong_shape:
        raise BundleError(_mismatch_message(what, missing, unexpected, wrong_shape))


# ----------------------------------------------------------------------------- U-Net


@dataclass(frozen=True)
class _UNetLayout:
    layers_per_block: list[int]  # resnets per down level (up levels have one more)
    down_attention: list[bool]
    up_attention: list[bool]  # indexed like diffusers' up_blocks (lowest resolution first)
    mid_block_type: str | None


_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def _unet_layout(config: Any) -> _UNetLayout:
    levels = len(_field(config, "block_out_channels"))
    down_types = list(_field(config, "down_block_types"))
    up_types = list(_field(config, "up_block_types"))
    mid_type = _field(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if len(down_types) != levels or len(up_types) != levels:
        raise IncompatibleError(
            f"U-Net config has {levels} block_out_channels but {len(down_types)} down / "
            f"{len(up_types)} up block types"
        )
    unsupported = [t for t in down_types if t not in _DOWN_TYPES] + [t for t in up_types if t not in _UP_TYPES]
    if unsupported or mid_type not in _MID_TYPES:
        raise IncompatibleError(
            f"U-Net block type {(unsupported or [mid_type])[0]!r} has no original-SD layout; "
            f"use {sorted(_DOWN_TYPES)}, {sorted(_UP_TYPES)} and {[t for t in _MID_TYPES if t]}"
        )
    return _UNetLayout(
        layers_per_block=_per_level(_field(config, "layers_per_block"), levels, "layers_per_block"),
        down_attention=[_DOWN_TYPES[t] for t in down_types],
        up_attention=[_UP_TYPES[t] for t in up_types],
        mid_block_type=mid_type,
    )


def _unet_table(layout: _UNetLayout) -> _ModuleTable:
    """diffusers module -> SD module, walking the U-Net in SD's sequential block order."""
    table: _ModuleTable = {
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "conv_in": ("input_blocks.0.0", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
    levels = len(layout.layers_per_block)

    block = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for layer in range(layout.layers_per_block[level]):
            table[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{block}.0", _UNET_RESNET)
            if layout.down_attention[level]:
                table[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{block}.1", None)
            block += 1
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", None)
            block += 1

    if layout.mid_block_type == "UNetMidBlock2DCrossAttn":
        table["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
        table["mid_block.attentions.0"] = ("middle_block.1", None)
        table["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET)
    elif layout.mid_block_type == "UNetMidBlock2D":
        table["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET)
        table["mid_block.resnets.1"] = ("middle_block.1", _UNET_RESNET)

    block = 0
    for up in range(levels):
        layers = layout.layers_per_block[levels - 1 - up] + 1  # one extra resnet eats the skip
        for layer in range(layers):
            table[f"up_blocks.{up}.resnets.{layer}"] = (f"output_blocks.{block}.0", _UNET_RESNET)
            if layout.up_attention[up]:
                table[f"up_blocks.{up}.attentions.{layer}"] = (f"output_blocks.{block}.1", None)
            if layer == layers - 1 and up < levels - 1:
                # the upsampler follows the transformer when there is one
                slot = 2 if layout.up_attention[up] else 1
                table[f"up_blocks.{up}.upsamplers.0.conv"] = (f"output_blocks.{block}.{slot}.conv", None)
            block += 1
    return table


def unet_diffusers_to_sd(sd: Mapping[str, Tensor], config: Any) -> StateDict:
    """diffusers UNet2DConditionModel names -> original SD names (without `model.diffusion_model.`).

    `config`: any object or mapping with block_out_channels, layers_per_block, down_block_types,
    up_block_types (and optionally mid_block_type) — e.g. `unet.config` or our UNetConfig.
    """
    return _remap(sd, _unet_table(_unet_layout(config)), "U-Net (diffusers layout)")


def unet_sd_to_diffusers(sd: Mapping[str, Tensor], config: Any) -> StateDict:
    """Original SD U-Net names (without `model.diffusion_model.`) -> diffusers names."""
    return _remap(sd, _invert(_unet_table(_unet_layout(config))), "U-Net (original SD layout)")


# ----------------------------------------------------------------------------- VAE


@dataclass(frozen=True)
class _VAELayout:
    levels: int
    layers_per_block: int
    mid_attention: bool
    quant_conv: bool
    post_quant_conv: bool


def _vae_layout_from_config(config: Any) -> _VAELayout:
    return _VAELayout(
        levels=len(_field(config, "block_out_channels")),
        layers_per_block=int(_field(config, "layers_per_block")),
        mid_attention=bool(_field(config, "mid_block_add_attention", True)),
        quant_conv=bool(_field(config, "use_quant_conv", True)),
        post_quant_conv=bool(_field(config, "use_post_quant_conv", True)),
    )


def _vae_layout_from_sd_keys(keys: Iterable[str]) -> _VAELayout:
    keys = list(keys)
    levels = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")}
    layers = {int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block.")}
    if not levels or not layers:
        raise BundleError("VAE weights have no encoder.down.* keys — is this an original-SD kl VAE?")
    return _VAELayout(
        levels=max(levels) + 1,
        layers_per_block=max(layers) + 1,
        mid_attention=any(k.startswith("encoder.mid.attn_1.") for k in keys),
        quant_conv="quant_conv.weight" in keys,
        post_quant_conv="post_quant_conv.weight" in keys,
    )


def _vae_table(layout: _VAELayout) -> _ModuleTable:
    """diffusers AutoencoderKL module -> SD module. SD numbers decoder levels from the top
    (decoder.up.0 is full resolution); diffusers runs them in order (up_blocks.0 is lowest)."""
    table: _ModuleTable = {}
    for side in ("encoder", "decoder"):
        table[f"{side}.conv_in"] = (f"{side}.conv_in", None)
        table[f"{side}.mid_block.resnets.0"] = (f"{side}.mid.block_1", _VAE_RESNET)
        table[f"{side}.mid_block.resnets.1"] = (f"{side}.mid.block_2", _VAE_RESNET)
        if layout.mid_attention:
            table[f"{side}.mid_block.attentions.0"] = (f"{side}.mid.attn_1", _VAE_ATTENTION)
        table[f"{side}.conv_norm_out"] = (f"{side}.norm_out", None)
        table[f"{side}.conv_out"] = (f"{side}.conv_out", None)

    last = layout.levels - 1
    for level in range(layout.levels):
        for layer in range(layout.layers_per_block):
            table[f"encoder.down_blocks.{level}.resnets.{layer}"] = (
                f"encoder.down.{level}.block.{layer}",
                _VAE_RESNET,
            )
        if level < last:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", None)

    for up in range(layout.levels):
        sd_level = last - up
        for layer in range(layout.layers_per_block + 1):
            table[f"decoder.up_blocks.{up}.resnets.{layer}"] = (f"decoder.up.{sd_level}.block.{layer}", _VAE_RESNET)
        if up < last:
            table[f"decoder.up_blocks.{up}.upsamplers.0.conv"] = (f"decoder.up.{sd_level}.upsample.conv", None)

    if layout.quant_conv:
        table["quant_conv"] = ("quant_conv", None)
    if layout.post_quant_conv:
        table["post_quant_conv"] = ("post_quant_conv", None)
    return table


def vae_diffusers_to_sd(sd: Mapping[str, Tensor], config: Any = None) -> StateDict:
    """diffusers AutoencoderKL names -> original SD names (without `first_stage_model.`).

    `config` (block_out_channels, layers_per_block, optional mid_block_add_attention /
    use_quant_conv / use_post_quant_conv) defaults to what `detect_vae_config` reads off `sd`.
    Mid-block attention q/k/v/proj_out come out as 1x1 conv weights [C, C, 1, 1], like SD's.
    """
    if config is None:
        from ldm_cli.interop.detect import detect_vae_config

        config = detect_vae_config(sd)
    mapped = _remap(sd, _vae_table(_vae_layout_from_config(config)), "VAE (diffusers layout)")
    for key, tensor in mapped.items():
        if ".mid.attn_1." in key and key.endswith(_VAE_SD_PROJECTIONS) and tensor.ndim == 2:
            mapped[key] = tensor[:, :, None, None]
    return mapped


def vae_sd_to_diffusers(sd: Mapping[str, Tensor], config: Any = None) -> StateDict:
    """Original SD VAE names (without `first_stage_model.`) -> diffusers AutoencoderKL names.

    `config` defaults to the layout read off the SD keys. Training-only `loss.*` weights
    (discriminator, LPIPS) that some first-stage checkpoints carry are left out.
    Mid-block attention projections come out as Linear weights [C, C].
    """
    weights = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    layout = _vae_layout_from_sd_keys(weights) if config is None else _vae_layout_from_config(config)
    mapped = _remap(weights, _invert(_vae_table(layout)), "VAE (original SD layout)")
    for key, tensor in mapped.items():
        if ".mid_block.attentions." in key and key.endswith(_VAE_DIFFUSERS_PROJECTIONS) and tensor.ndim > 2:
            mapped[key] = tensor.reshape(tensor.shape[0], tensor.shape[1])
    return mapped


# ----------------------------------------------------------------------------- CLIP text encoder

_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_CLIP_REQUIRED = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight")


@cache
def installed_clip_uses_text_model_prefix() -> bool:
    """Whether the installed transformers' CLIPTextModel.state_dict() keys start with `text_model.`
    (transformers < 5.6) or not (5.6+, where the wrapper module was folded away)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return any(key.startswith("text_model.") for key in model.state_dict())


def _clip_body(sd: Mapping[str, Tensor], what: str) -> StateDict:
    """Strip an optional `text_model.` prefix, drop position_ids buffers, refuse anything else."""
    body: StateDict = {}
    unexpected: list[str] = []
    for key, tensor in sd.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue  # a buffer (arange) older transformers saved; rebuilt by the model
        if not name.startswith(_CLIP_ROOTS):
            unexpected.append(key)
            continue
        body[name] = tensor
    missing = [name for name in _CLIP_REQUIRED if name not in body]
    if missing or unexpected:
        raise BundleError(_mismatch_message(what, missing, unexpected))
    return body


def text_sd_to_transformers(sd: Mapping[str, Tensor], text_model_prefix: bool | None = None) -> StateDict:
    """Original SD text-encoder names (without `cond_stage_model.transformer.`) -> CLIPTextModel names.

    Accepts keys with or without `text_model.`; `text_model_prefix=None` matches the installed
    transformers' own layout (no prefix since 5.6), True/False forces one.
    """
    if text_model_prefix is None:
        text_model_prefix = installed_clip_uses_text_model_prefix()
    prefix = "text_model." if text_model_prefix else ""
    return {prefix + name: tensor for name, tensor in _clip_body(sd, "CLIP text encoder (original SD layout)").items()}


def text_transformers_to_sd(sd: Mapping[str, Tensor]) -> StateDict:
    """CLIPTextModel names (either transformers layout) -> original SD names, `text_model.*`
    (without `cond_stage_model.transformer.`; no position_ids buffer)."""
    body = _clip_body(sd, "CLIP text encoder (transformers layout)")
    return {f"text_model.{name}": tensor for name, tensor in body.items()}


# ----------------------------------------------------------------------------- whole checkpoints


def split_sd_checkpoint(sd: Mapping[str, Tensor]) -> dict[str, StateDict]:
    """Split an original SD checkpoint into its parts, prefixes stripped.

    Returns {"unet", "vae", "text_encoder", "other"}; `other` keeps full names (model_ema.*,
    betas, alphas_cumprod, ...). `join_sd_checkpoint` is the exact inverse.
    """
    parts: dict[str, StateDict] = {name: {} for name in (*_PART_PREFIXES, "other")}
    for key, tensor in sd.items():
        for part, prefix in _PART_PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix) :]] = tensor
                break
        else:
            parts["other"][key] = tensor
    return parts


def join_sd_checkpoint(parts: Mapping[str, Mapping[str, Tensor]]) -> StateDict:
    """Inverse of `split_sd_checkpoint`: add the prefixes back. Absent parts are skipped."""
    unknown = set(parts) - {*_PART_PREFIXES, "other"}
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; expected {[*_PART_PREFIXES, 'other']}")
    joined: StateDict = {}
    for part, weights in parts.items():
        prefix = _PART_PREFIXES.get(part, "")
        for key, tensor in weights.items():
            name = prefix + key
            if name in joined:
                raise ValueError(f"two checkpoint parts both define {name!r}")
            joined[name] = tensor
    return joined


def _flat_ema_name(unet_key: str) -> str:
    """LitEma's buffer name for `model.diffusion_model.<unet_key>`: the dots removed."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def extract_ema_unet(sd: Mapping[str, Tensor], unet_keys: Iterable[str] | None = None) -> StateDict | None:
    """The EMA U-Net of an original SD checkpoint, in SD U-Net names (no prefix); None without EMA.

    LitEma stores `model_ema.diffusion_modelinput_blocks00weight` for
    `model.diffusion_model.input_blocks.0.0.weight`; names are restored from the checkpoint's
    non-EMA U-Net keys, or from `unet_keys` (SD U-Net names) when the file has none.
    """
    flat_ema = {k: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    ema_weights = {k for k in flat_ema if k not in (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")}
    if not ema_weights:
        return None
    if unet_keys is not None:
        names = list(unet_keys)
    else:
        names = [k[len(UNET_PREFIX) :] for k in sd if k.startswith(UNET_PREFIX)]
    if not names:
        raise BundleError(
            "checkpoint has EMA weights but no model.diffusion_model.* keys to name them by — "
            "pass the U-Net key names (unet_keys)"
        )
    by_flat_name = {_flat_ema_name(name): name for name in names}
    if len(by_flat_name) != len(names):
        raise BundleError("U-Net key names collide once their dots are removed; cannot restore EMA names")
    missing = [name for flat, name in by_flat_name.items() if flat not in ema_weights]
    unexpected = sorted(ema_weights - by_flat_name.keys())
    if missing or unexpected:
        raise BundleError(_mismatch_message("EMA U-Net", missing, unexpected))
    return {name: flat_ema[flat] for flat, name in by_flat_name.items()}
