"""Latent-diffusion bundles: what `train-diffusion` and `convert` write and sampling reads.

Layout of a `latent-diffusion` bundle directory:
    bundle.json       kind, unet/schedule/text_encoder configs, latent scale, resolution, hashes
    unet.safetensors  U-Net weights (EMA when training used EMA), diffusers parameter names
    autoencoder/      the autoencoder bundle it was trained with (copied, so the bundle is whole)
    text_encoder/     the text encoder in Hugging Face layout, when it is not a hub model
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ldm_cli.adapters.merge import Applied, merge_loras
from ldm_cli.autoencoder.load import LoadedAutoencoder, bundle_latent_space, load_autoencoder, shares_latent_space
from ldm_cli.bundle import Bundle, build_from_weights, load_bundle, require_model_keys, write_bundle
from ldm_cli.config import from_dict, to_dict
from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldm_cli.diffusion.text import TextEncoder, TextEncoderConfig, load_text_encoder, save_text_encoder
from ldm_cli.diffusion.unet import UNet
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.errors import BundleError, IncompatibleError

BUNDLED_TEXT_ENCODER = "text_encoder"


@dataclass
class LatentDiffusion:
    """Everything sampling needs, loaded: U-Net, schedule, text encoder, autoencoder."""

    bundle: Bundle
    unet: UNet
    schedule: NoiseSchedule
    text_encoder: TextEncoder
    autoencoder: LoadedAutoencoder

    @property
    def resolution(self) -> int:
        return int(self.bundle.meta["resolution"])

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.autoencoder.downsampling_factor

    @property
    def is_inpainting(self) -> bool:
        """An inpainting U-Net (SD 1.5-inpainting) reads latent + mask + masked-image latent channels."""
        return is_inpainting_unet(self.unet.config.in_channels, self.latent_channels)


def is_inpainting_unet(unet_in_channels: int, latent_channels: int) -> bool:
    return unet_in_channels == 2 * latent_channels + 1


def build_unet(config: UNetConfig, weights: dict[str, torch.Tensor]) -> UNet:
    """The U-Net holding `weights` (their dtype; see `build_from_weights`)."""
    return build_from_weights(lambda: UNet(config), weights, "U-Net")


def text_encoder_config(bundle: Bundle) -> TextEncoderConfig:
    config = from_dict(bundle.meta["text_encoder"], TextEncoderConfig)
    if bundle.meta.get("text_encoder_bundled"):
        config.pretrained, config.tiny = str(bundle.path / BUNDLED_TEXT_ENCODER), False
    return config


class WeightDtypes(NamedTuple):
    """The dtype each part's weights are read into."""

    unet: torch.dtype = torch.float32
    autoencoder: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32


def load_latent_diffusion(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtypes: WeightDtypes = WeightDtypes(),
    loras: Applied = (),
) -> LatentDiffusion:
    """Load a bundle with each part's weights read straight into its dtype in `dtypes`. `loras` (file,
    scale) are merged into float32 weights, which are then cast."""
    bundle = load_bundle(path, kind="latent-diffusion")
    require_model_keys(bundle)
    meta = bundle.meta
    text_encoder = load_text_encoder(text_encoder_config(bundle), device, torch.float32 if loras else dtypes.text_encoder)
    weights = bundle.tensors("unet", device, dtype=torch.float32 if loras else dtypes.unet)
    if loras:
        merge_loras(weights, text_encoder.model, loras)
        text_encoder.to(dtype=dtypes.text_encoder)
        for key, value in weights.items():  # one tensor at a time: the float32 copy shrinks as it goes
            weights[key] = value.to(dtypes.unet)
    unet = build_unet(from_dict(meta["unet"], UNetConfig), weights).to(device=device).eval()
    del weights
    unet.requires_grad_(False)
    schedule = NoiseSchedule(from_dict(meta["schedule"], ScheduleConfig)).to(device)
    autoencoder_dir = bundle.path / meta["autoencoder"]["path"]
    autoencoder = load_autoencoder(autoencoder_dir, device=device, dtype=dtypes.autoencoder)
    if autoencoder.bundle.content_hash != meta["autoencoder"]["content_hash"]:
        raise BundleError(f"the autoencoder in {autoencoder_dir} is not the one this model was trained with (content hash differs)")
    return LatentDiffusion(bundle, unet, schedule, text_encoder, autoencoder)


def write_latent_diffusion_bundle(
    directory: Path,
    unet_weights: dict[str, torch.Tensor],
    unet_config: UNetConfig,
    schedule_config: ScheduleConfig,
    text_config: TextEncoderConfig,
    text_encoder: TextEncoder | None,
    autoencoder: Bundle,
    extra: dict | None = None,
) -> Bundle:
    """Write a complete bundle. The text encoder is copied in unless it is a hub id
    (then `text_encoder` may be None and only its config is stored)."""
    bundle_text = text_config.tiny or (text_config.pretrained is not None and Path(text_config.pretrained).expanduser().exists())
    with tempfile.TemporaryDirectory() as scratch:
        folders = {"autoencoder": autoencoder.path}
        if bundle_text:
            if text_encoder is None:
                raise ValueError("a local or random text encoder must be passed to be bundled")
            folders[BUNDLED_TEXT_ENCODER] = save_text_encoder(text_encoder, Path(scratch) / BUNDLED_TEXT_ENCODER)
        meta = {
            "unet": to_dict(unet_config),
            "schedule": to_dict(schedule_config),
            "text_encoder": to_dict(text_config),
            "text_encoder_bundled": bool(bundle_text),
            "autoencoder": {"path": "autoencoder", "content_hash": autoencoder.content_hash},
            "latent_scale": autoencoder.meta["latent_scale"],
            "latent_shift": autoencoder.meta.get("latent_shift", 0.0),
            "latent_channels": autoencoder.meta.get("autoencoder", {}).get("latent_channels", unet_config.in_channels),
            "resolution": autoencoder.meta["resolution"],
            **(extra or {}),
        }
        return write_bundle(directory, "latent-diffusion", {"unet": unet_weights}, meta, folders=folders)



def replace_autoencoder(directory: Path, autoencoder: Bundle, out: Path | None = None) -> Bundle:
    """The latent-diffusion bundle in `directory`, rewritten (into `out`, default in place) with `autoencoder`
    in place of its own. It must share the latent space (as a decoder-only fine-tune does): the U-Net's
    latents then decode with it."""
    bundle = load_bundle(directory, kind="latent-diffusion")
    current = load_bundle(bundle.path / bundle.meta["autoencoder"]["path"], kind="autoencoder")
    if autoencoder.kind != "autoencoder":
        raise IncompatibleError(f"{autoencoder.path} is a {autoencoder.kind} bundle, not an autoencoder")
    if not shares_latent_space({"content_hash": current.content_hash, "latent_space_hash": bundle_latent_space(current)}, autoencoder):
        raise IncompatibleError(
            f"autoencoder {autoencoder.path} has another encoder or latent scale than {bundle.path}'s own; "
            "only a decoder-only fine-tune of it (loss.decoder_only=true) decodes its latents"
        )
    files = bundle.meta["files"]
    folders = {name: bundle.path / files[name] for name in files if (bundle.path / files[name]).is_dir()}
    folders["autoencoder"] = autoencoder.path
    weights = {name: bundle.tensors(name) for name in files if name not in folders}
    meta = {key: value for key, value in bundle.meta.items() if key not in ("kind", "ldm_version", "files", "hashes", "content_hash")}
    meta["autoencoder"] = {"path": "autoencoder", "content_hash": autoencoder.content_hash}
    return write_bundle(out or bundle.path, "latent-diffusion", weights, meta, folders=folders)
