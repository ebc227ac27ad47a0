"""`ldm train-lora`: `train-diffusion`'s step and loop with only LoRA adapters trainable.

The base model (an ldm bundle) stays frozen and is never written; the run's product is
`RUN/lora.safetensors` in kohya/A1111 layout, rewritten (atomically) at every checkpoint.
Checkpoints hold the adapters and their optimiser state only. With `lora.train_text_encoder` the CLIP
text encoder gets adapters too (`lora_te_*` in the file), at `lora.text_encoder_lr`, and captions are
encoded through it every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextModel

from ldm_cli.adapters.files import read_lora_file
from ldm_cli.adapters.inject import adapted_modules, base_state, inject_lora, inject_text_lora, load_lora_layers, lora_layers
from ldm_cli.adapters.kohya import write_kohya_file
from ldm_cli.adapters.layers import TEXT_ENCODER, UNET, LoraLayer
from ldm_cli.adapters.metadata import kohya_metadata
from ldm_cli.adapters.targets import ModelTargets
from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.bundle import Bundle
from ldm_cli.config import TrainLoraConfig, from_dict
from ldm_cli.diffusion.load import load_latent_diffusion, text_encoder_config
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.text import TextEncoder
from ldm_cli.diffusion.train import (
    DiffusionTrainer, TextConditioning, _cache_matches, batch_order, check_base_autoencoder, check_text_cache,
)
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


class AdaptedTextConditioning:
    """Caption → embedding through the text encoder whose adapters are being trained: encoded at every
    step (no memo, no cache: the encoder changes), with gradients while training. Dropped captions become
    the empty prompt before encoding, so the unconditional embedding is the adapted encoder's too."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.seen: set[str] = set()  # captions already checked for truncation (warned about once)

    @property
    def uncond(self) -> torch.Tensor:
        return self.encode([""])[0]

    def encode(self, captions: list[str]) -> torch.Tensor:
        new = [caption for caption in dict.fromkeys(captions) if caption not in self.seen]
        if len(self.seen) > 50_000:  # bound the memory on huge caption sets
            self.seen.clear()
        self.seen.update(new)
        return self.encoder.embed(captions, warn=bool(new)).float()

    def __call__(self, batch: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
        captions = [caption if kept else "" for caption, kept in zip(batch["caption"], keep.tolist())]
        return self.encode(captions)


class LoraTrainer(DiffusionTrainer):
    def __init__(self, config: TrainLoraConfig, *args: Any, base: Bundle, run_dir: Path, **kwargs: Any) -> None:
        self.base, self.run_dir = base, Path(run_dir)
        self.text_model: torch.nn.Module | None = None  # the adapted CLIP text model (lora.train_text_encoder)
        self.text_ema: EMA | None = None
        super().__init__(config, *args, **kwargs)
        if config.train.ema_decay:
            self.ema = EMA(_Trainable(self.unet), config.train.ema_decay)
            if self.text_model is not None:
                self.text_ema = EMA(_Trainable(self.text_model), config.train.ema_decay)

    def _adapt(self, unet: UNet) -> UNet:
        lora = self.config.lora
        inject_lora(unet, lora)
        text_model = self.conditioning.encoder.model
        if lora.train_text_encoder:  # here, after the trainer seeded the RNG: every process draws the same A
            self.text_model = text_model
            inject_text_lora(text_model, lora)
        if lora.init_from:
            shapes = {UNET: base_state(unet), TEXT_ENCODER: base_state(text_model)}
            file = read_lora_file(lora.init_from)
            layers = ModelTargets({part: {k: v.shape for k, v in state.items()} for part, state in shapes.items()}).resolve(file)
            if self.text_model is None and any(name.startswith(TEXT_ENCODER + ".") for name in layers):
                raise IncompatibleError(f"lora.init_from {file.path} has text-encoder layers; set lora.train_text_encoder=true to continue them")
            load_lora_layers(unet, layers)
            if self.text_model is not None:
                load_lora_layers(self.text_model, layers, TEXT_ENCODER)
        return unet

    def _text_parameters(self) -> list[torch.Tensor]:
        return [p for _, p in _Trainable(self.text_model).named_parameters()] if self.text_model is not None else []

    def _parameters(self) -> list[torch.Tensor]:
        return [*super()._parameters(), *self._text_parameters()]

    def _parameter_groups(self) -> list[torch.Tensor] | list[dict[str, Any]]:
        """U-Net adapters at train.lr, text-encoder adapters at lora.text_encoder_lr (kohya's --unet_lr/--text_encoder_lr)."""
        if self.text_model is None:
            return super()._parameters()
        lr = self.config.lora.text_encoder_lr
        return [{"params": super()._parameters()}, {"params": self._text_parameters(), **({"lr": lr} if lr is not None else {})}]

    def _synchronise_gradients(self) -> None:
        """DDP averages the U-Net's gradients; the text encoder's adapters (outside it) are averaged here, in one all-reduce."""
        if not self.dist.enabled or self.text_model is None:
            return
        parameters = self._text_parameters()
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in parameters])
        torch.distributed.all_reduce(flat)
        flat /= self.dist.world_size
        for p, value in zip(parameters, flat.split([p.numel() for p in parameters])):
            p.grad.copy_(value.view_as(p.grad))

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor | float]:
        if self.text_model is not None:
            self.text_model.train()  # LoRA dropout (CLIP itself has none)
        metrics = super().train_step(micro_batches, step)
        if self.text_ema is not None:
            self.text_ema.update(_Trainable(self.text_model))
        return metrics

    @contextlib.contextmanager
    def _evaluated_text_encoder(self) -> Iterator[None]:
        """The text encoder as held-out losses and previews see it: eval mode, EMA adapters when enabled."""
        if self.text_model is None:
            yield
            return
        self.text_model.eval()
        if self.text_ema is None:
            yield
            return
        params = dict(self.text_model.named_parameters())
        trained = {name: params[name].detach().clone() for name in self.text_ema.shadow}
        with torch.no_grad():
            for name, value in self.text_ema.shadow.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in trained.items():
                    params[name].copy_(value)

    def evaluate(self, step: int) -> dict[str, float]:
        with self._evaluated_text_encoder():
            return super().evaluate(step)

    def write_images(self, step: int, path: Path) -> None:
        with self._evaluated_text_encoder():
            super().write_images(step, path)

    def weights(self) -> dict[str, torch.Tensor]:
        """The U-Net adapters' parameters (state-dict names): all a checkpoint needs of the U-Net besides the base."""
        return {name: p.detach().clone() for name, p in _Trainable(self.unet).named_parameters()}

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        _load_adapters(self.unet, weights)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.text_model is not None:
            state["text_encoder"] = {name: p.detach().clone() for name, p in _Trainable(self.text_model).named_parameters()}
            state["text_ema"] = self.text_ema.state_dict() if self.text_ema else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("text_encoder")
        if (saved is None) != (self.text_model is None):
            trained = "true" if saved is not None else "false"
            raise IncompatibleError(f"the checkpoint's run has lora.train_text_encoder={trained}; resume with lora.train_text_encoder={trained}")
        if saved is not None:
            _load_adapters(self.text_model, saved)
            if self.text_ema is not None and state.get("text_ema") is not None:
                self.text_ema.load_state_dict(state["text_ema"])
        super().load_state_dict(state)

    def shipped_layers(self) -> dict[str, LoraLayer]:
        """The adapters a file ships (U-Net, then text encoder): EMA-averaged when enabled."""
        alpha = self.config.lora.effective_alpha
        layers = lora_layers(self.unet, alpha, self.ema.shadow if self.ema else None)
        if self.text_model is not None:
            layers.update(lora_layers(self.text_model, alpha, self.text_ema.shadow if self.text_ema else None, TEXT_ENCODER))
        return layers

    def export(self, step: int) -> None:
        """Write RUN/lora.safetensors (called at every checkpoint)."""
        meta = kohya_metadata(self.config.lora, self.base, step, self.data.latent_shape[-1] * self.autoencoder.downsampling_factor,
                              len(self.data), self.run_dir.name, self.config.train.lr)
        write_kohya_file(self.shipped_layers(), self.run_dir / LORA_FILE, meta)


def _load_adapters(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(".lora_" in key for key in missing):
        raise IncompatibleError(f"the checkpoint's adapters do not match lora.rank/lora.targets (e.g. {(unexpected or missing)[0]})")


def check_adaptable_text_encoder(text_encoder: TextEncoder, base_path: Path) -> None:
    """LoRA files name CLIP's layers (`lora_te_text_model_…`, `text_encoder.text_model.…`): only a CLIP text
    encoder's adapters can be written in a form other tools read."""
    if not isinstance(text_encoder.model, CLIPTextModel):
        kind = text_encoder.model.config.model_type
        raise IncompatibleError(
            f"lora.train_text_encoder needs a CLIP text encoder (the one LoRA files for Stable Diffusion adapt), but {base_path} "
            f"uses a '{kind}' model; set lora.train_text_encoder=false to adapt the U-Net only"
        )


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
    text_encoder = base.text_encoder.to(device)
    if config.lora.train_text_encoder:
        check_adaptable_text_encoder(text_encoder, base_path)
        if data.text_info is not None:
            raise IncompatibleError(
                f"lora.train_text_encoder encodes the captions through the adapted text encoder at every step, but {latents} "
                "holds text embeddings cached from the frozen one; re-encode without --cache-text (the raw captions are kept)"
            )
        conditioning = AdaptedTextConditioning(text_encoder)
    else:
        check_text_cache(data, latents, config.objective)
        conditioning = TextConditioning(text_encoder, device, data.uncond_text() if _cache_matches(data, config) else None)
    autoencoder = load_autoencoder(data.autoencoder_path, device=device)
    trainer = LoraTrainer(config, data, autoencoder, conditioning, device, dist, base.unet.state_dict(), base=base.bundle, run_dir=out)
    if dist.is_main:
        trainable = sum(p.numel() for p in trainer._parameters())
        text = f" + {len(adapted_modules(trainer.text_model))} text-encoder" if trainer.text_model is not None else ""
        print(f"LoRA: {len(adapted_modules(trainer.unet))} U-Net{text} layers ({config.lora.targets}), rank {config.lora.rank}: "
              f"{trainable:,} trainable parameters (the U-Net has {trainer.unet.num_parameters():,})")
    lock = on_main(dist, lambda: claim_run(out, "train-lora", config))  # everything is checked: only now is --out written
    try:
        train_loop(trainer, data, config.train, out, dist, collate=collate_latents, description="train-lora",
                   batches=batch_order(data, config.train, dist))
    finally:
        if lock is not None:
            lock.release()
    return out / LORA_FILE
