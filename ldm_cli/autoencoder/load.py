"""Load a trained autoencoder from its bundle, with its latent scale: what later stages use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import Bundle, build_from_weights, load_bundle, require_model_keys
from ldm_cli.config import from_dict


@dataclass
class LoadedAutoencoder:
    model: AutoencoderKL
    bundle: Bundle
    latent_scale: float  # multiplies raw latents so the diffusion model sees unit variance
    latent_shift: float
    resolution: int

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def downsampling_factor(self) -> int:
        return self.model.downsampling_factor

    def to_diffusion_space(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_shift) * self.latent_scale

    def from_diffusion_space(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latent_scale + self.latent_shift


# the parameters that map images to latents; the decoder's only read them
LATENT_SPACE_PREFIXES = ("encoder.", "quant_conv.")


def latent_space_hash(weights: dict[str, torch.Tensor], latent_scale: float, latent_shift: float) -> str:
    """Identifies an autoencoder's latent space: its encoder's weights and the latent scale and shift.
    A decoder-only fine-tune keeps it, so latents encoded before decode with the new decoder too."""
    digest = hashlib.sha256(json.dumps([float(latent_scale), float(latent_shift)]).encode())
    for key in sorted(name for name in weights if name.startswith(LATENT_SPACE_PREFIXES)):
        tensor = weights[key].detach().contiguous().cpu()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bundle_latent_space(bundle: Bundle) -> str:
    """An autoencoder bundle's latent-space hash: stored when it was written, else computed."""
    meta = bundle.meta
    return meta.get("latent_space_hash") or latent_space_hash(
        bundle.tensors("autoencoder"), meta["latent_scale"], meta.get("latent_shift", 0.0))


def shares_latent_space(recorded: dict, bundle: Bundle) -> bool:
    """Whether latents made with the autoencoder `recorded` (its content_hash and latent_space_hash)
    decode with `bundle`: the same autoencoder, or one with the same encoder and scale."""
    if recorded.get("content_hash") == bundle.content_hash:
        return True
    return bool(recorded.get("latent_space_hash")) and recorded["latent_space_hash"] == bundle_latent_space(bundle)


def build_autoencoder(meta: dict, weights: dict[str, torch.Tensor]) -> AutoencoderKL:
    """The autoencoder holding `weights` (their dtype; see `build_from_weights`)."""
    config = from_dict(meta["autoencoder"], AutoencoderConfig)
    return build_from_weights(lambda: AutoencoderKL(config), weights, "autoencoder")


def load_autoencoder(path: str | Path | Bundle, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedAutoencoder:
    bundle = path if isinstance(path, Bundle) else load_bundle(path)
    if bundle.kind == "latent-diffusion":  # a full model: use the autoencoder it carries
        require_model_keys(bundle)
        bundle = load_bundle(bundle.path / bundle.meta["autoencoder"]["path"], kind="autoencoder")
    require_model_keys(bundle)
    model = build_autoencoder(bundle.meta, bundle.tensors("autoencoder", device, dtype=dtype)).to(device=device).eval()
    model.requires_grad_(False)
    meta = bundle.meta
    return LoadedAutoencoder(model, bundle, float(meta["latent_scale"]), float(meta.get("latent_shift", 0.0)), int(meta["resolution"]))
