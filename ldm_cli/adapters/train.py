"""`ldm train-lora`: `train-diffusion`'s step and loop with only LoRA adapters trainable.

The base model (an ldm bundle) stays frozen and is never written; the run's product is
`RUN/lora.safetensors` in kohya/A1111 layout, rewritten (atomically) at every checkpoint.
Checkpoints hold the adapters and their optimiser state only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm_cli.adapters.files import read_lora_file
from ldm_cli.adapters.inject import adapted_modules, base_state, inject_lora, load_lora_layers, lora_layers
from ldm_cli.adapters.kohya import write_kohya_file
from ldm_cli.adapters.metadata import kohya_metadata
from ldm_cli.adapters.targets import ModelTargets
from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.bundle import Bundle
from ldm_cli.config import TrainLoraConfig, from_dict
from ldm_cli.diffusion.load import load_latent_diffusion, text_encoder_config
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.train import DiffusionTrainer, TextConditioning, _cache_matches, check_base_autoencoder
from ldm_cli.diffusion.unet import UNet
from ldm_cli.errors import ConfigError, IncompatibleError
from ldm_cli.latents.dataset import LatentDataset, collate_latents
from ldm_cli.training.distributed import DistInfo, device_for, distributed, on_main
from ldm_cli.training.ema import EMA
from ldm_cli.training.loop import train_loop
from ldm_cli.training.precision import deterministic_kernels, resolve_device
from ldm_cli.training.run_dir import claim_run, open_run

LORA_FILE = "lora.safetensors"


class _Trainable:
    """The adapters' parameters only, so EMA averages them and not the frozen base."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def named_parameters(self):
        return ((name, p) for name, p in self.module.named_parameters() if p.requires_grad)


class LoraTrainer(DiffusionTrainer):
    def __init__(self, config: TrainLoraConfig, *args: Any, base: Bundle, run_dir: Path, **kwargs: Any) -> None:
        self.base, self.run_dir = base, Path(run_dir)
        super().__init__(config, *args, **kwargs)
        if config.train.ema_decay:
            self.ema = EMA(_Trainable(self.unet), config.train.ema_decay)

    def _adapt(self, unet: UNet) -> UNet:
        lora = self.config.lora
        inject_lora(unet, lora)
        if lora.init_from:
            file = read_lora_file(lora.init_from)
            load_lora_layers(unet, ModelTargets.of(base_state(unet), None).resolve(file))
        return unet

    def weights(self) -> dict[str, torch.Tensor]:
        """The adapters' parameters (state-dict names): all a checkpoint needs besides the base."""
        return {name: p.detach().clone() for name, p in self.unet.named_parameters() if p.requires_grad}

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.unet.load_state_dict(weights, strict=False)
        if unexpected or any(".lora_" in key for key in missing):
            raise IncompatibleError(f"the checkpoint's adapters do not match lora.rank/lora.targets (e.g. {(unexpected or missing)[0]})")

    def shipped_layers(self) -> dict:
        """The adapters a file ships: EMA-averaged when enabled."""
        return lora_layers(self.unet, self.config.lora.effective_alpha, self.ema.shadow if self.ema else None)

    def export(self, step: int) -> None:
        """Write RUN/lora.safetensors (called at every checkpoint)."""
        meta = kohya_metadata(self.config.lora, self.base, step, self.data.latent_shape[-1] * self.autoencoder.downsampling_factor,
                              len(self.data), self.run_dir.name)
        write_kohya_file(self.shipped_layers(), self.run_dir / LORA_FILE, meta)


def train_lora(
    config: TrainLoraConfig, latents: Path, base_path: Path, out: Path, overrides: list[str],
    resume: bool = False, device_name: str = "auto",
) -> Path:
    """Train (or resume) LoRA adapters on a frozen base model; returns RUN/lora.safetensors."""
    if config.train.bf16_weights:
        raise ConfigError("train.bf16_weights: LoRA training keeps the frozen base as it is; set train.bf16_weights=false")
    device = resolve_device(device_name)
    with distributed(device, config.train.dist_timeout_minutes) as dist, deterministic_kernels(config.train.deterministic):
        return _train_lora(config, latents, Path(base_path), Path(out), overrides, resume, device_for(device, dist), dist)


def _train_lora(
    config: TrainLoraConfig, latents: Path, base_path: Path, out: Path, overrides: list[str], resume: bool,
    device: torch.device, dist: DistInfo,
) -> Path:
    data = LatentDataset(latents)
    base = load_latent_diffusion(base_path)
    check_base_autoencoder(data, latents, base, base_path)
    # the base model decides the architecture, schedule and text encoder
    config.unet, config.text_encoder = base.unet.config, text_encoder_config(base.bundle)
    config.schedule = from_dict(base.bundle.meta["schedule"], ScheduleConfig)
    # decides without writing (a failed start leaves --out untouched); every process reads the same directory
    opened = on_main(dist, lambda: open_run(out, "train-lora", config, overrides, resume))
    config, _ = opened if dist.is_main else open_run(out, "train-lora", config, overrides, resume)
    autoencoder = load_autoencoder(data.autoencoder_path, device=device)
    text_encoder = base.text_encoder.to(device)
    conditioning = TextConditioning(text_encoder, device, data.uncond_text() if _cache_matches(data, config) else None)
    trainer = LoraTrainer(config, data, autoencoder, conditioning, device, dist, base.unet.state_dict(), base=base.bundle, run_dir=out)
    if dist.is_main:
        trainable = sum(p.numel() for p in trainer.unet.parameters() if p.requires_grad)
        print(f"LoRA: {len(adapted_modules(trainer.unet))} layers ({config.lora.targets}), rank {config.lora.rank}, "
              f"{trainable:,} trainable parameters of {trainer.unet.num_parameters():,}")
    lock = on_main(dist, lambda: claim_run(out, "train-lora", config))  # everything is checked: only now is --out written
    try:
        train_loop(trainer, data, config.train, out, dist, collate=collate_latents, description="train-lora")
    finally:
        if lock is not None:
            lock.release()
    return out / LORA_FILE
