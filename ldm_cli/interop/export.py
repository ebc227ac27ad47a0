"""`ldm convert --to diffusers | sd-single-file`: a latent-diffusion bundle out to the formats other tools load.

diffusers       a StableDiffusionPipeline folder: model_index.json, unet/, vae/, text_encoder/,
                tokenizer/, scheduler/ (DDIM with the bundle's schedule), no safety checker
sd-single-file  one .safetensors in the original CompVis layout (model.diffusion_model.*,
                first_stage_model.*, cond_stage_model.transformer.*), with ldm's configs in its
                metadata so that `ldm convert` reads it back exactly

Tensors are copied unchanged (only renamed); only safetensors are written; outputs appear whole
or not at all (written aside, then moved into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ldm_cli import __version__
from ldm_cli.autoencoder.model import AutoencoderConfig
from ldm_cli.bundle import Bundle, load_bundle, write_safetensors
from ldm_cli.config import from_dict, to_dict
from ldm_cli.diffusion.load import BUNDLED_TEXT_ENCODER, text_encoder_config
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.text import load_text_encoder, save_text_encoder
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.errors import BundleError, IncompatibleError, RunDirError, UsageError
from ldm_cli.interop.imported import METADATA_KEY
from ldm_cli.interop.sd_keys import join_sd_checkpoint, text_transformers_to_sd, unet_diffusers_to_sd, vae_diffusers_to_sd
from ldm_cli.interop.single_file import StateDict, read_folder_weights

Log = Callable[[str], None]

_DIFFUSERS_BETA_SCHEDULES = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
_TEXT_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


@dataclass
class _Model:
    """A latent-diffusion bundle's parts, read without building any network."""

    bundle: Bundle
    unet_config: UNetConfig
    unet_weights: StateDict
    autoencoder: Bundle
    autoencoder_config: AutoencoderConfig
    schedule: ScheduleConfig
    latent_scale: float
    latent_shift: float
    resolution: int

    def provenance(self) -> dict[str, str]:
        return {"format": "pt", "ldm_version": __version__, "ldm_source_bundle": self.bundle.content_hash}


def _read_model(path: str | Path) -> _Model:
    bundle = load_bundle(path)
    if bundle.kind != "latent-diffusion":
        raise BundleError(
            f"{bundle.path} is an '{bundle.kind}' bundle; --to diffusers and --to sd-single-file export a whole "
            "'latent-diffusion' model (U-Net, autoencoder, text encoder), e.g. the bundle of `ldm train-diffusion`"
        )
    meta = bundle.meta
    autoencoder = load_bundle(bundle.path / meta["autoencoder"]["path"], kind="autoencoder")
    if autoencoder.content_hash != meta["autoencoder"]["content_hash"]:
        raise BundleError(
            f"the autoencoder in {autoencoder.path} is not the one this model was trained with (content hash differs)"
        )
    return _Model(
        bundle=bundle,
        unet_config=from_dict(meta["unet"], UNetConfig),
        unet_weights=bundle.tensors("unet"),
        autoencoder=autoencoder,
        autoencoder_config=from_dict(autoencoder.meta["autoencoder"], AutoencoderConfig),
        schedule=from_dict(meta["schedule"], ScheduleConfig),
        latent_scale=float(autoencoder.meta["latent_scale"]),
        latent_shift=float(autoencoder.meta.get("latent_shift", 0.0)),
        resolution=int(meta.get("resolution", autoencoder.meta["resolution"])),
    )


def _text_folder(model: _Model, scratch: Path) -> Path:
    """A complete HF folder of the text encoder: the bundled one, or a hub model saved from the cache."""
    if model.bundle.meta.get("text_encoder_bundled"):
        return model.bundle.path / BUNDLED_TEXT_ENCODER
    encoder = load_text_encoder(text_encoder_config(model.bundle))  # offline: MissingWeightsError says how to fetch it
    return save_text_encoder(encoder, scratch / BUNDLED_TEXT_ENCODER)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _staged(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(staging_path)` beside `out`, then move the result into place (nothing half-written)."""
    if out.exists():
        raise RunDirError(f"{out} already exists; choose a new --out (nothing was overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(staging_dir / out.name)
        os.replace(staging_dir / out.name, out)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ diffusers


def diffusers_unet_config(model: _Model) -> dict[str, Any]:
    config = model.unet_config.to_diffusers_config()
    config["sample_size"] = model.resolution // model.autoencoder_config.downsampling_factor
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": _diffusers_version(), **config}


def diffusers_vae_config(model: _Model) -> dict[str, Any]:
    config = model.autoencoder_config
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _diffusers_version(),
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": model.resolution,
        "scaling_factor": model.latent_scale,
        "shift_factor": model.latent_shift or None,
        "mid_block_add_attention": config.mid_block_add_attention,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "force_upcast": True,
    }


def diffusers_scheduler_config(schedule: ScheduleConfig) -> dict[str, Any]:
    """DDIM over the bundle's training schedule, with SD's sampling conventions."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": _DIFFUSERS_BETA_SCHEDULES[schedule.beta_schedule],
        "trained_betas": None,
        "prediction_type": schedule.prediction_type,
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        # zero terminal SNR needs the last timestep sampled (Lin et al. 2023, §3.3)
        "timestep_spacing": "trailing" if schedule.rescale_betas_zero_snr else "leading",
    }


def _write_text_encoder(folder: Path, target: Path, log: Log) -> tuple[str, str]:
    """text_encoder/ (config + weights, copied byte for byte) and tokenizer/; returns their class names."""
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    (target / "text_encoder").mkdir(parents=True)
    for name in _TEXT_MODEL_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / "text_encoder" / name)
    for shard in folder.glob("model-*.safetensors"):
        shutil.copy2(shard, target / "text_encoder" / shard.name)
    if config.get("model_type") != "clip_text_model":
        # ldm feeds non-CLIP encoders an attention mask; this flag makes StableDiffusionPipeline do the same
        config["use_attention_mask"] = True
        _write_json(target / "text_encoder" / "config.json", config)
        log(f"note: the text encoder is {config.get('model_type')}, not CLIP; diffusers loads it, other SD tools may not")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.save_pretrained(target / "tokenizer")
    architectures = config.get("architectures") or ["CLIPTextModel"]
    return architectures[0], type(tokenizer).__name__


def export_diffusers(bundle_path: str | Path, out: str | Path, log: Log = print) -> Path:
    """Write a folder that diffusers' `StableDiffusionPipeline.from_pretrained(out)` loads and runs."""
    model = _read_model(bundle_path)
    if model.latent_shift:
        log(f"note: latent shift {model.latent_shift} goes to vae shift_factor, which StableDiffusionPipeline ignores")
    provenance = model.provenance()
    # an inpainting U-Net (latent + mask + masked-image latent channels) loads as the inpainting pipeline
    inpainting = model.unet_config.in_channels == 2 * model.autoencoder_config.latent_channels + 1
    pipeline_class = "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline"

    def write(target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="ldm-export-") as scratch:
            text_model_class, tokenizer_class = _write_text_encoder(_text_folder(model, Path(scratch)), target, log)
        _write_json(target / "unet" / "config.json", diffusers_unet_config(model))
        write_safetensors(model.unet_weights, target / "unet" / "diffusion_pytorch_model.safetensors", provenance)
        _write_json(target / "vae" / "config.json", diffusers_vae_config(model))
        vae_weights = model.autoencoder.tensors("autoencoder")
        write_safetensors(vae_weights, target / "vae" / "diffusion_pytorch_model.safetensors", provenance)
        _write_json(target / "scheduler" / "scheduler_config.json", diffusers_scheduler_config(model.schedule))
        _write_json(target / "model_index.json", {
            "_class_name": pipeline_class,
            "_diffusers_version": _diffusers_version(),
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", text_model_class],
            "tokenizer": ["transformers", tokenizer_class],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })

    _staged(Path(out).expanduser(), write)
    log(f"wrote diffusers {pipeline_class} folder {out} (DDIM scheduler, {model.schedule.prediction_type}, "
        f"{model.resolution}px, no safety checker)")
    return Path(out)


# ------------------------------------------------------------------------------------- single file


def single_file_metadata(model: _Model, text_hf_config: Optional[dict[str, Any]]) -> dict[str, str]:
    """String metadata: where the file came from, and ldm's configs (which the weights cannot tell)."""
    configs = {
        "unet": to_dict(model.unet_config),
        "autoencoder": to_dict(model.autoencoder_config),
        "schedule": to_dict(model.schedule),
        "latent_scale": model.latent_scale,
        "latent_shift": model.latent_shift,
        "resolution": model.resolution,
        "text_encoder_hf": text_hf_config,
    }
    return {**model.provenance(), METADATA_KEY: json.dumps(configs, sort_keys=True)}


def export_single_file(bundle_path: str | Path, out: str | Path, log: Log = print) -> Path:
    """Write one .safetensors in the original Stable Diffusion layout (U-Net, VAE, CLIP text encoder)."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise UsageError(f"--out for --to sd-single-file must end in .safetensors, got {out.name}")
    model = _read_model(bundle_path)
    with tempfile.TemporaryDirectory(prefix="ldm-export-") as scratch:
        text_folder = _text_folder(model, Path(scratch))
        text_hf_config = json.loads((text_folder / "config.json").read_text())
        if text_hf_config.get("model_type") != "clip_text_model":
            raise IncompatibleError(
                f"the original SD layout holds a CLIP text encoder; this model's is {text_hf_config.get('model_type')}; "
                "export it with --to diffusers instead"
            )
        text_weights = text_transformers_to_sd(read_folder_weights(text_folder, "model"))
    parts = {
        "unet": unet_diffusers_to_sd(model.unet_weights, model.unet_config),
        "vae": vae_diffusers_to_sd(model.autoencoder.tensors("autoencoder"), model.autoencoder_config),
        "text_encoder": text_weights,
    }
    tensors = join_sd_checkpoint(parts)
    metadata = single_file_metadata(model, text_hf_config)
    _staged(out, lambda target: write_safetensors(tensors, target, metadata))
    log(f"wrote original-layout Stable Diffusion file {out} ({len(tensors)} tensors; the tokenizer is not part of "
        "this format: importing it again needs --text-encoder or the Hugging Face cache)")
    return out
