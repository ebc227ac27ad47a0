"""`ldm convert` import: Stable Diffusion checkpoints → ldm bundles that `sample`, `img2img`,
`encode` and `train-diffusion --init-from` use as they are.

Sources: an original (CompVis) single file, .safetensors or a legacy .ckpt read weights-only; a
diffusers pipeline folder; a standalone VAE (either layout, file or folder → an autoencoder bundle).

    read safely → names to diffusers' (sd_keys) → architecture from configs or off the weights
    (detect) → every key and shape checked against the model → print what was found → write

Nothing is written until every part has been read and checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import BUNDLE_JSON, Bundle, write_bundle
from ldm_cli.config import from_dict, to_dict
from ldm_cli.diffusion.load import BUNDLED_TEXT_ENCODER, write_latent_diffusion_bundle
from ldm_cli.diffusion.schedule import ScheduleConfig, make_betas
from ldm_cli.diffusion.text import TextEncoder, TextEncoderConfig, load_text_encoder
from ldm_cli.diffusion.unet import UNet, UNetConfig
from ldm_cli.errors import BundleError, ConfigError, IncompatibleError, MissingWeightsError, RunDirError, UsageError
from ldm_cli.interop.detect import detect_prediction_type, detect_unet_config, detect_vae_config
from ldm_cli.interop.sd_keys import (
    EMA_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    check_keys,
    extract_ema_unet,
    split_sd_checkpoint,
    text_sd_to_transformers,
    text_transformers_to_sd,
    unet_sd_to_diffusers,
    vae_sd_to_diffusers,
)
from ldm_cli.interop.single_file import StateDict, find_weights, read_checkpoint, read_folder_weights

Log = Callable[[str], None]

TARGETS = ("ldm", "diffusers", "sd-single-file")
SD_LATENT_SCALE = 0.18215  # std normaliser of SD's kl-f8 VAE latents: a property of that VAE, stored per bundle
SD1_TEXT_ENCODER = "openai/clip-vit-large-patch14"  # SD v1's frozen text tower (CLIP ViT-L/14, width 768)
SD1_TEXT_WIDTH = 768
SD1_RESOLUTION = 512
CLIP_HEAD_CHANNELS = 64  # every CLIP text tower SD uses has 64 channels per attention head
METADATA_KEY = "ldm_model"  # ldm's own single files carry their configs here (export.py), read back exactly
_EMA_COUNTERS = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
# schedule tables the original LatentDiffusion class saves next to the weights; rebuilt from the config
_SD_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
}
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
_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}


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


# ------------------------------------------------------------------------------------ entry points


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers draws a bar per tiny load/save; conversion prints its own summary instead."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_model(
    source: str | Path, out: str | Path, to: str = "ldm", options: ImportOptions | None = None, log: Log = print
) -> Path:
    """`ldm convert`: import into a bundle (to="ldm"), or export a bundle (to="diffusers" /
    "sd-single-file"). A foreign source exported directly is imported into a temporary bundle first."""
    from ldm_cli.interop.export import export_diffusers, export_single_file

    if to not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.exists():
        raise UsageError(f"--from {source} does not exist")
    _refuse_existing(out)
    is_bundle = (source / BUNDLE_JSON).is_file() or (source / "bundle" / BUNDLE_JSON).is_file()
    if to == "ldm":
        if is_bundle:
            raise UsageError(f"{source} is already an ldm bundle; export it with --to diffusers or --to sd-single-file")
        bundle = import_checkpoint(source, out, options, log)
        log(f"wrote {bundle.kind} bundle {bundle.path}")
        return bundle.path
    export = export_diffusers if to == "diffusers" else export_single_file
    if is_bundle:
        given = options or ImportOptions()
        if given.prediction_type or given.text_encoder or given.resolution:
            raise UsageError("--prediction-type, --text-encoder and --resolution apply when importing, not to an ldm bundle")
        with quiet_progress_bars():
            return export(source, out, log)
    with tempfile.TemporaryDirectory(prefix="ldm-convert-") as scratch:
        bundle = import_checkpoint(source, Path(scratch) / "bundle", options, log)
        with quiet_progress_bars():
            return export(bundle.path, out, log)


def import_checkpoint(
    source: str | Path, out: str | Path, options: ImportOptions | None = None, log: Log = print
) -> Bundle:
    """Read an SD checkpoint, diffusers folder or VAE and write an ldm bundle to `out`."""
    source, out, options = Path(source).expanduser(), Path(out).expanduser(), options or ImportOptions()
    _refuse_existing(out)
    if options.resolution is not None and options.resolution <= 0:
        raise UsageError(f"--resolution must be positive, got {options.resolution}")
    with tempfile.TemporaryDirectory(prefix="ldm-convert-") as scratch_dir, quiet_progress_bars():
        scratch = Path(scratch_dir)
        imported = _read_source(source, options, scratch, log)
        if isinstance(imported, ImportedAutoencoder):
            _describe_autoencoder(imported, log)
            bundle = _write_autoencoder(imported, out, {"path": str(source.resolve())})
        else:
            _describe(imported, log)
            bundle = _write_latent_diffusion(imported, out, scratch)
    return bundle


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise RunDirError(f"{out} already exists; choose a new --out (nothing was overwritten)")


def _read_source(source: Path, options: ImportOptions, scratch: Path, log: Log) -> ImportedModel | ImportedAutoencoder:
    if source.is_dir():
        if (source / BUNDLE_JSON).is_file():
            raise UsageError(f"{source} is already an ldm bundle; export it with --to diffusers or --to sd-single-file")
        if (source / "model_index.json").is_file():
            log(f"source: {source} (diffusers pipeline folder)")
            return _from_diffusers_pipeline(source, options, scratch, log)
        config = source / "config.json"
        if config.is_file() and _read_json(config).get("_class_name") == "AutoencoderKL":
            log(f"source: {source} (diffusers AutoencoderKL folder)")
            return _diffusers_vae(source, options.resolution, log)
        raise BundleError(
            f"{source} is not a diffusers pipeline (no model_index.json), a diffusers VAE folder (no AutoencoderKL "
            "config.json) or an ldm bundle; pass the pipeline's top folder or a single .safetensors/.ckpt file"
        )
    tensors, metadata = read_checkpoint(source)
    hints = _ldm_hints(metadata)
    layout = _classify(tensors, source)
    dtype = _dtype(tensors)
    if layout == "sd":
        log(f"source: {source} (original Stable Diffusion layout, {len(tensors)} tensors, {dtype})")
        return _from_sd_single_file(tensors, hints, options, scratch, log, source)
    log(f"source: {source} (standalone VAE, {layout} layout, {dtype})")
    if options.prediction_type or options.text_encoder:
        log("note: --prediction-type and --text-encoder do not apply to a VAE; ignored")
    if layout == "original":
        vae = split_sd_checkpoint(tensors)["vae"] or {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
        weights = vae_sd_to_diffusers(vae)  # with or without first_stage_model.
    else:
        weights = tensors
    return _autoencoder_from_weights(weights, hints, options.resolution)


def _classify(tensors: Mapping[str, torch.Tensor], source: Path) -> str:
    """'sd' (a whole original checkpoint), 'original' / 'diffusers' (a VAE alone, in that layout)."""
    keys = list(tensors)
    if any(key.startswith(UNET_PREFIX) or (key.startswith(EMA_PREFIX) and key not in _EMA_COUNTERS) for key in keys):
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


# ------------------------------------------------------------------------ original single files


def _from_sd_single_file(
    tensors: StateDict, hints: dict, options: ImportOptions, scratch: Path, log: Log, source: Path
) -> ImportedModel:
    parts = split_sd_checkpoint(tensors)
    sd_unet, ema = _choose_unet_weights(tensors, parts["unet"], options.use_ema, log)
    unet_weights = unet_sd_to_diffusers(sd_unet, _sd_unet_layout(sd_unet))
    if not parts["vae"]:
        raise BundleError(f"{source} has U-Net weights but no first_stage_model.* (VAE) weights; is it a whole SD checkpoint?")
    autoencoder = _autoencoder_from_weights(vae_sd_to_diffusers(parts["vae"]), hints, options.resolution)

    if hints.get("unet"):
        unet_fields = dict(hints["unet"])
    else:
        unet_fields = detect_unet_config(unet_weights)
        unet_fields["norm_num_groups"] = _norm_groups(unet_fields["block_out_channels"])
    unet_fields["sample_size"] = autoencoder.resolution // (2 ** (len(autoencoder.config.block_out_channels) - 1))
    unet_config = _unet_config(unet_fields)

    if hints.get("schedule"):
        raw_schedule, origin = dict(hints["schedule"]), "ldm metadata"
    else:
        raw_schedule = _schedule_from_betas(parts["other"].get("betas"))
        origin = "the file's betas" if raw_schedule else "SD v1 defaults"
    schedule, schedule_origin = _schedule(raw_schedule, origin, options.prediction_type, log)

    unknown = sorted(k for k in parts["other"] if k not in _SD_BUFFERS and not k.startswith(EMA_PREFIX))
    other_text = [k for k in unknown if k.startswith("cond_stage_model.")]
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        log(f"ignored {len(unknown)} tensors outside the U-Net/VAE/CLIP parts: {shown}")

    if parts["text_encoder"]:
        weights = text_sd_to_transformers(parts["text_encoder"])
        tokenizer, tokenizer_origin = _find_tokenizer(options.text_encoder, None, _clip_width(weights), source)
        clip_config = _clip_config(weights, tokenizer, hints.get("text_encoder_hf"))
        origin = f"{source.name} (CLIP weights), tokenizer from {tokenizer_origin}"
        text = _bundle_clip(weights, clip_config, tokenizer, scratch / "text_encoder", origin)
    elif other_text and options.text_encoder is None:
        raise IncompatibleError(
            f"{source} holds a text encoder in a layout ldm cannot read ({other_text[0]}, e.g. SD 2's OpenCLIP); "
            "pass --text-encoder <hub id or folder of the matching CLIP text model in transformers format>"
        )
    else:
        text = _referenced_text(options.text_encoder, unet_config.cross_attention_dim, scratch, log)
    source_record = {"path": str(source.resolve()), "format": "sd-single-file", "ema": ema}
    return ImportedModel(unet_weights, unet_config, autoencoder, schedule, text, source_record, schedule_origin)


def _choose_unet_weights(tensors: StateDict, unet: StateDict, use_ema: bool, log: Log) -> tuple[StateDict, str]:
    has_ema = any(k.startswith(EMA_PREFIX) and k not in _EMA_COUNTERS for k in tensors)
    if has_ema and use_ema:
        log("EMA: present in the file, used (--no-ema for the raw trained weights)")
        return extract_ema_unet(tensors), "used"
    log("EMA: present in the file, not used (--no-ema)" if has_ema else "EMA: not in the file (weights used as stored)")
    if not unet:
        raise BundleError("the file has no model.diffusion_model.* U-Net weights (only EMA ones); convert it with --ema")
    return unet, "present, not used" if has_ema else "absent"


def _block_indices(keys: set[str], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)})


def _sd_unet_layout(sd_unet: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The block structure of an original-SD U-Net, read off its keys: what `unet_sd_to_diffusers`
    needs before the full config can be detected from diffusers names."""
    keys = set(sd_unet)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    blocks = _block_indices(keys, "input_blocks.")
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


def _norm_groups(channels: list[int]) -> int:
    """GroupNorm groups are not in the weights: SD's 32, or the largest count all widths allow (tiny models)."""
    common = math.gcd(*channels)
    return max(groups for groups in range(1, 33) if common % groups == 0)


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


# --------------------------------------------------------------------------------- diffusers folders


def _from_diffusers_pipeline(folder: Path, options: ImportOptions, scratch: Path, log: Log) -> ImportedModel:
    for part in ("unet", "vae"):
        if not (folder / part / "config.json").is_file():
            raise MissingWeightsError(f"{folder} has no {part}/config.json; is the download complete?")
    if options.use_ema is False:
        log("note: --no-ema has no effect on a diffusers folder (it holds one U-Net)")
    unet_raw = _read_json(folder / "unet" / "config.json")
    _refuse_options(unet_raw, _UNET_OPTIONS_OFF, f"{folder / 'unet'}")
    vae_raw = _read_json(folder / "vae" / "config.json")
    factor = 2 ** (len(vae_raw.get("block_out_channels", [0])) - 1)
    resolution = options.resolution or (int(unet_raw["sample_size"]) * factor if "sample_size" in unet_raw else None)
    autoencoder = _diffusers_vae(folder / "vae", resolution, log)

    unet_fields = {f.name: unet_raw[f.name] for f in dataclasses.fields(UNetConfig) if f.name in unet_raw}
    unet_fields["sample_size"] = autoencoder.resolution // factor
    unet_config = _unet_config(unet_fields)
    unet_weights = read_folder_weights(folder / "unet", "diffusion_pytorch_model")

    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        raw_schedule = _read_json(scheduler_config)
        if raw_schedule.get("trained_betas") is not None:
            raise IncompatibleError(
                f"{scheduler_config} lists trained_betas; ldm supports {', '.join(_BETA_SCHEDULES)} schedules"
            )
        origin = f"scheduler/ ({raw_schedule.get('_class_name', 'scheduler')})"
    else:
        raw_schedule, origin = {}, "SD v1 defaults (no scheduler/scheduler_config.json)"
    schedule, schedule_origin = _schedule(raw_schedule, origin, options.prediction_type, log)

    if (folder / "text_encoder" / "config.json").is_file():
        text = _diffusers_text(folder, options.text_encoder, scratch)
    else:
        text = _referenced_text(options.text_encoder, unet_config.cross_attention_dim, scratch, log)
    source_record = {"path": str(folder.resolve()), "format": "diffusers", "ema": "n/a"}
    return ImportedModel(unet_weights, unet_config, autoencoder, schedule, text, source_record, schedule_origin)


def _diffusers_vae(folder: Path, resolution: Optional[int], log: Log) -> ImportedAutoencoder:
    raw = _read_json(folder / "config.json")
    _refuse_options(raw, _VAE_OPTIONS_OFF, str(folder))
    levels = len(raw.get("block_out_channels", []))
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(kind != block for kind in raw.get(name, [block] * levels)):
            raise IncompatibleError(f"{folder}: {name}={raw[name]} — ldm's autoencoder has {block} blocks only")
    if raw.get("latents_mean") is not None or raw.get("latents_std") is not None:
        log("note: the VAE config's latents_mean/latents_std are ignored (as StableDiffusionPipeline does)")
    names = {f.name for f in dataclasses.fields(AutoencoderConfig)} - {"gradient_checkpointing"}
    fields = {name: raw[name] for name in names if name in raw}
    config = _checked(lambda: from_dict(fields, AutoencoderConfig), "autoencoder")
    weights = read_folder_weights(folder, "diffusion_pytorch_model")
    return ImportedAutoencoder(
        weights=weights,
        config=config,
        latent_scale=float(raw.get("scaling_factor") or SD_LATENT_SCALE),
        latent_shift=float(raw.get("shift_factor") or 0.0),
        resolution=int(resolution or raw.get("sample_size") or SD1_RESOLUTION),
    )


def _refuse_options(raw: Mapping[str, Any], off: Mapping[str, Any], what: str) -> None:
    for name, value_off in off.items():
        value = raw.get(name, value_off)
        values = value if isinstance(value, list) else [value]
        if any(v != value_off for v in values):
            raise IncompatibleError(
                f"{what} sets {name}={value!r}, which ldm's models do not implement "
                "(they run Stable Diffusion v1/v2 architectures)"
            )


def _diffusers_text(folder: Path, option: Optional[str], scratch: Path) -> ImportedText:
    model_dir = folder / "text_encoder"
    raw = _read_json(model_dir / "config.json")
    tokenizer, tokenizer_origin = _find_tokenizer(option, folder / "tokenizer", None, folder)
    if raw.get("model_type") == "clip_text_model":
        from transformers import CLIPTextConfig

        # through the SD map and back: one CLIP layout whatever transformers wrote it, unknown keys refused
        weights = text_sd_to_transformers(text_transformers_to_sd(read_folder_weights(model_dir, "model")))
        clip_config = CLIPTextConfig.from_pretrained(str(model_dir))
        origin = f"{model_dir}, tokenizer from {tokenizer_origin}"
        return _bundle_clip(weights, clip_config, tokenizer, scratch / "text_encoder", origin)
    # another encoder family (BERT, T5, ...): transformers reads its own folder, we only add the tokenizer
    target = scratch / "text_encoder"
    shutil.copytree(model_dir, target)
    tokenizer.save_pretrained(target)
    return _load_text_folder(target, f"{model_dir} ({raw.get('model_type')}), tokenizer from {tokenizer_origin}")


# ------------------------------------------------------------------------------------ standalone VAE


def _autoencoder_from_weights(weights: StateDict, hints: dict, resolution: Optional[int]) -> ImportedAutoencoder:
    """A VAE in diffusers names, its config from ldm's metadata or read off the weights."""
    if hints.get("autoencoder"):
        config = _checked(lambda: from_dict(hints["autoencoder"], AutoencoderConfig), "autoencoder")
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
            norm_num_groups=_norm_groups(detected["block_out_channels"]),
            mid_block_add_attention=detected["mid_block_add_attention"],
        )
    return ImportedAutoencoder(
        weights=weights,
        config=config,
        latent_scale=float(hints.get("latent_scale", SD_LATENT_SCALE)),
        latent_shift=float(hints.get("latent_shift", 0.0)),
        resolution=int(resolution or hints.get("resolution") or SD1_RESOLUTION),
    )


# ----------------------------------------------------------------------------------- text encoders


def _clip_width(weights: Mapping[str, torch.Tensor]) -> int:
    body = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return int(body["embeddings.token_embedding.weight"].shape[1])


def _find_tokenizer(option: Optional[str], folder_tokenizer: Optional[Path], clip_width: Optional[int], source: Path):
    """(tokenizer, where it came from): --text-encoder, else the source's own tokenizer/, else
    SD v1's CLIP tokenizer from the Hugging Face cache. Offline only."""
    if option is not None:
        candidates = _folder_candidates(option, "tokenizer")
    elif folder_tokenizer is not None:
        candidates = [str(folder_tokenizer)]
    elif clip_width == SD1_TEXT_WIDTH:
        candidates = [SD1_TEXT_ENCODER]
    else:
        candidates = []
    for candidate in candidates:
        tokenizer = _load_tokenizer(candidate)
        if tokenizer is not None:
            return tokenizer, candidate
    wanted = option or (str(folder_tokenizer) if folder_tokenizer else SD1_TEXT_ENCODER)
    raise MissingWeightsError(
        f"{source} holds the text encoder's weights but its tokenizer ({wanted}) is not on this machine; pass "
        f"--text-encoder <folder with the tokenizer files, or a diffusers folder>, e.g. from "
        f"`huggingface-cli download {SD1_TEXT_ENCODER} --include '*.json' '*.txt' --local-dir clip-vit-large-patch14`"
    )


def _folder_candidates(option: str, subfolder: str) -> list[str]:
    path = Path(option).expanduser()
    if path.is_dir():
        return [str(path / subfolder), str(path)] if (path / subfolder).is_dir() else [str(path)]
    return [option]  # a hub id: the Hugging Face cache


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _clip_config(weights: Mapping[str, torch.Tensor], tokenizer, hint: Optional[dict]):
    """A CLIPTextConfig read off the weights; what weights cannot tell is SD v1's (OpenAI CLIP) choice."""
    from transformers import CLIPTextConfig

    if hint:
        return CLIPTextConfig.from_dict(hint)
    body = {k.removeprefix("text_model."): v for k, v in weights.items()}
    fc1 = body.get("encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise BundleError("CLIP text encoder weights have no encoder.layers.0.mlp.fc1 — is the file complete?")
    vocab_size, width = body["embeddings.token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(width),
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=len(_block_indices(set(body), "encoder.layers.")),
        num_attention_heads=max(1, int(width) // CLIP_HEAD_CHANNELS),
        max_position_embeddings=int(body["embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu",  # OpenAI CLIP (SD v1); OpenCLIP towers use gelu but come in another layout
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _bundle_clip(weights: StateDict, clip_config, tokenizer, folder: Path, origin: str) -> ImportedText:
    """Write a complete HF folder (config, weights, tokenizer), check it, and load it to be bundled."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    with torch.device("meta"):
        expected = CLIPTextModel(clip_config).state_dict()
    check_keys(weights, {k: v for k, v in expected.items() if not k.endswith("position_ids")}, "CLIP text encoder")
    if len(tokenizer) > clip_config.vocab_size:
        raise IncompatibleError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder embeds only {clip_config.vocab_size}; "
            "pass its own tokenizer with --text-encoder"
        )
    folder.mkdir(parents=True)
    clip_config.architectures = ["CLIPTextModel"]
    clip_config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else clip_config.max_position_embeddings
    tokenizer.model_max_length = min(limit, clip_config.max_position_embeddings)
    tokenizer.save_pretrained(folder)
    return _load_text_folder(folder, origin, dtype=next(iter(weights.values())).dtype)


def _load_text_folder(folder: Path, origin: str, dtype: torch.dtype | None = None) -> ImportedText:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    positions = getattr(hf_config, "max_position_embeddings", 77)
    config = TextEncoderConfig(pretrained=str(folder), max_length=min(77, positions))
    encoder = load_text_encoder(config, dtype=dtype or _stored_dtype(folder))
    parameters = sum(p.numel() for p in encoder.model.parameters())
    return ImportedText(config, encoder, origin, parameters)


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of a text encoder's safetensors weights (read from the header), so bundling keeps it."""
    from safetensors import safe_open

    try:
        first = find_weights(folder, "model")[0]
    except MissingWeightsError:
        return torch.float32  # e.g. pytorch_model.bin: transformers reads it, in float32
    if first.suffix != ".safetensors":
        return torch.float32
    with safe_open(str(first), framework="pt") as handle:
        keys = list(handle.keys())
        return handle.get_tensor(keys[0]).dtype if keys else torch.float32


def _referenced_text(option: Optional[str], context_dim: int, scratch: Path, log: Log) -> ImportedText:
    """The source has no text encoder: a local folder given by --text-encoder (bundled), else a hub id (named)."""
    if option is None:
        if context_dim != SD1_TEXT_WIDTH:
            raise UsageError(
                f"the source has no text encoder and its U-Net reads {context_dim}-wide text embeddings; "
                "name one with --text-encoder (a hub id or a local folder)"
            )
        option = SD1_TEXT_ENCODER
    path = Path(option).expanduser()
    if not path.is_dir():
        log(f"text encoder: {option} (named, not bundled: `ldm sample` loads it from the Hugging Face cache)")
        return ImportedText(TextEncoderConfig(pretrained=option), None, option)
    if (path / "text_encoder").is_dir():  # a diffusers pipeline folder: its encoder and tokenizer, as one folder
        folder = scratch / "text_encoder"
        shutil.copytree(path / "text_encoder", folder)
        for file in (path / "tokenizer").glob("*") if (path / "tokenizer").is_dir() else []:
            shutil.copy2(file, folder / file.name)
        path = folder
    return _load_text_folder(path, option)


# ------------------------------------------------------------------------------- configs and checks


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{path} is not readable JSON ({error})") from error
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def _checked(build: Callable[[], Any], what: str) -> Any:
    try:
        return build()
    except ConfigError as error:
        raise IncompatibleError(f"this {what} is not one ldm can run: {error}") from error


def _unet_config(fields: dict[str, Any]) -> UNetConfig:
    return _checked(lambda: from_dict(fields, UNetConfig), "U-Net")


def _schedule(raw: Mapping[str, Any], origin: str, override: Optional[str], log: Log) -> tuple[ScheduleConfig, str]:
    """The training schedule and a note on where it (and the prediction type) came from."""
    beta_schedule = raw.get("beta_schedule", "scaled_linear")
    if beta_schedule not in _BETA_SCHEDULES:
        raise IncompatibleError(f"beta_schedule {beta_schedule!r} is not supported; ldm has {', '.join(_BETA_SCHEDULES)}")
    source_type = raw.get("prediction_type")
    prediction_type = detect_prediction_type(override=override or source_type)
    defaults = ScheduleConfig()
    config = _checked(
        lambda: ScheduleConfig(
            num_train_timesteps=int(raw.get("num_train_timesteps", defaults.num_train_timesteps)),
            beta_schedule=_BETA_SCHEDULES[beta_schedule],
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


def _check_unet(weights: StateDict, config: UNetConfig) -> None:
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = UNet(config).state_dict()
    check_keys(weights, expected, "U-Net")


def _check_autoencoder(weights: StateDict, config: AutoencoderConfig) -> None:
    with torch.device("meta"):
        expected = AutoencoderKL(config).state_dict()
    check_keys(weights, expected, "VAE")


def _millions(weights: Mapping[str, torch.Tensor] | int) -> str:
    count = weights if isinstance(weights, int) else sum(t.numel() for t in weights.values())
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"


def _dtype(weights: Mapping[str, torch.Tensor]) -> str:
    """The dtype holding most of the values (schedule buffers and ids do not count)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in weights.values():
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return str(max(sizes, key=sizes.get)).removeprefix("torch.")


def _describe_autoencoder(autoencoder: ImportedAutoencoder, log: Log) -> None:
    _check_autoencoder(autoencoder.weights, autoencoder.config)
    config = autoencoder.config
    if autoencoder.resolution % config.downsampling_factor:
        raise UsageError(
            f"--resolution {autoencoder.resolution} is not a multiple of the autoencoder's factor {config.downsampling_factor}"
        )
    shift = f", shift {autoencoder.latent_shift}" if autoencoder.latent_shift else ""
    log(
        f"autoencoder: {_millions(autoencoder.weights)} parameters ({_dtype(autoencoder.weights)}), channels "
        f"{config.block_out_channels}, {config.latent_channels} latent channels, f{config.downsampling_factor}, "
        f"latent scale {autoencoder.latent_scale}{shift}"
    )
    log(f"resolution: {autoencoder.resolution}px")


def _describe(model: ImportedModel, log: Log) -> None:
    """Check every part against its model (keys and shapes), then say what was found."""
    unet, text = model.unet_config, model.text
    _check_unet(model.unet_weights, unet)
    if unet.in_channels != model.autoencoder.config.latent_channels:
        raise IncompatibleError(
            f"the U-Net reads {unet.in_channels} channels but the VAE makes "
            f"{model.autoencoder.config.latent_channels}-channel latents"
        )
    if text.encoder is not None and text.encoder.width != unet.cross_attention_dim:
        raise IncompatibleError(
            f"the text encoder ({text.origin}) is {text.encoder.width} wide but the U-Net's cross-attention reads "
            f"{unet.cross_attention_dim}; pass the matching one with --text-encoder"
        )
    projection = "linear" if unet.use_linear_projection else "conv"
    log(
        f"U-Net: {_millions(model.unet_weights)} parameters ({_dtype(model.unet_weights)}), channels "
        f"{unet.block_out_channels}, layers {unet.layers_per_block}, context dim {unet.cross_attention_dim}, "
        f"heads {unet.attention_head_dim}, {projection} projections, blocks {unet.down_block_types}"
    )
    _describe_autoencoder(model.autoencoder, log)
    if text.encoder is not None:
        kind = text.encoder.model.config.model_type
        log(f"text encoder: {kind}, {_millions(text.parameters)} parameters, width {text.encoder.width}, "
            f"{text.config.max_length} tokens, bundled; from {text.origin}")
    schedule = model.schedule
    zero_snr = ", zero terminal SNR" if schedule.rescale_betas_zero_snr else ""
    log(f"schedule: {schedule.beta_schedule} betas {schedule.beta_start} → {schedule.beta_end}, "
        f"{schedule.num_train_timesteps} steps, predicts {schedule.prediction_type}{zero_snr} ({model.schedule_origin})")


# ---------------------------------------------------------------------------------------- writing


def _write_autoencoder(autoencoder: ImportedAutoencoder, directory: Path, source: dict[str, Any]) -> Bundle:
    meta = {
        "autoencoder": to_dict(autoencoder.config),
        "latent_scale": autoencoder.latent_scale,
        "latent_shift": autoencoder.latent_shift,
        "resolution": autoencoder.resolution,
        "source": source,
    }
    return write_bundle(directory, "autoencoder", {"autoencoder": autoencoder.weights}, meta)


def _write_latent_diffusion(model: ImportedModel, out: Path, scratch: Path) -> Bundle:
    source = {**model.source, "text_encoder": model.text.origin}
    autoencoder = _write_autoencoder(model.autoencoder, scratch / "autoencoder", source)
    extra: dict[str, Any] = {"source": source}
    if model.text.encoder is not None:
        # bundled: record the folder's name inside the bundle, not the scratch folder it was built in
        extra["text_encoder"] = to_dict(dataclasses.replace(model.text.config, pretrained=BUNDLED_TEXT_ENCODER))
    return write_latent_diffusion_bundle(
        out, model.unet_weights, model.unet_config, model.schedule, model.text.config, model.text.encoder,
        autoencoder, extra=extra,
    )
