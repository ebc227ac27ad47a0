"""Check each imported part (checks.py), then say in one line what was found — before anything is written."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm_cli.interop.checks import check_autoencoder, check_unet_fits
from ldm_cli.interop.imported import ImportedAutoencoder, ImportedModel, Log


def millions(weights: Mapping[str, torch.Tensor] | int) -> str:
    count = weights if isinstance(weights, int) else sum(t.numel() for t in weights.values())
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count / 1e3:.1f}k"


def main_dtype(weights: Mapping[str, torch.Tensor]) -> str:
    """The dtype holding most of the values (schedule buffers and ids do not count)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in weights.values():
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return str(max(sizes, key=sizes.get)).removeprefix("torch.")


def describe_autoencoder(autoencoder: ImportedAutoencoder, log: Log) -> None:
    check_autoencoder(autoencoder)
    config = autoencoder.config
    shift = f", shift {autoencoder.latent_shift}" if autoencoder.latent_shift else ""
    log(
        f"autoencoder: {millions(autoencoder.weights)} parameters ({main_dtype(autoencoder.weights)}), channels "
        f"{config.block_out_channels}, {config.latent_channels} latent channels, f{config.downsampling_factor}, "
        f"latent scale {autoencoder.latent_scale}{shift}"
    )
    log(f"resolution: {autoencoder.resolution}px")


def describe(model: ImportedModel, log: Log) -> None:
    unet, text = model.unet_config, model.text
    check_unet_fits(model)
    projection = "linear" if unet.use_linear_projection else "conv"
    log(
        f"U-Net: {millions(model.unet_weights)} parameters ({main_dtype(model.unet_weights)}), channels "
        f"{unet.block_out_channels}, layers {unet.layers_per_block}, context dim {unet.cross_attention_dim}, "
        f"heads {unet.attention_head_dim}, {projection} projections, blocks {unet.down_block_types}"
    )
    describe_autoencoder(model.autoencoder, log)
    if text.encoder is not None:
        kind = text.encoder.model.config.model_type
        log(f"text encoder: {kind}, {millions(text.parameters)} parameters, width {text.encoder.width}, "
            f"{text.config.max_length} tokens, bundled; from {text.origin}")
    schedule = model.schedule
    zero_snr = ", zero terminal SNR" if schedule.rescale_betas_zero_snr else ""
    log(f"schedule: {schedule.beta_schedule} betas {schedule.beta_start} → {schedule.beta_end}, "
        f"{schedule.num_train_timesteps} steps, predicts {schedule.prediction_type}{zero_snr} ({model.schedule_origin})")
