"""`ldm train-vae`: one autoencoder + discriminator step, plugged into the shared training loop.

Under `torchrun` each process trains on its shard of every batch: the autoencoder and the
discriminator are DistributedDataParallel (SyncBatchNorm in the discriminator on GPUs), the learned
log-variance and the adaptive GAN weight's gradients are averaged across processes, and the
posterior noise is drawn per (seed, step, micro-batch) for the whole global batch and sliced, so
N processes with batch B train like one process with batch N*B, and a resumed run like an
uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from ldm_cli.autoencoder.load import LoadedAutoencoder, latent_space_hash, load_autoencoder
from ldm_cli.autoencoder.loss import AutoencoderLoss
from ldm_cli.autoencoder.lpips import load_lpips
from ldm_cli.autoencoder.model import AutoencoderKL, DiagonalGaussian
from ldm_cli.bundle import write_bundle
from ldm_cli.config import TrainVaeConfig, to_dict
from ldm_cli.data.images import ImageFolderDataset
from ldm_cli.errors import ConfigError
from ldm_cli.eval.metrics import psnr, ssim
from ldm_cli.grid import make_grid, save_image
from ldm_cli.training.distributed import DistInfo, device_for, distributed, on_main
from ldm_cli.training.ema import EMA
from ldm_cli.training.loop import check_finite_loss, train_loop
from ldm_cli.training.optim import build_lr_schedule, build_optimizer
from ldm_cli.training.optimizer_state import load_optimizer_state, optimizer_state
from ldm_cli.training.precision import autocast, deterministic_kernels, grad_scaler, resolve_device, resolve_precision
from ldm_cli.training.run_dir import claim_run, open_run


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([item["image"] for item in items]), "caption": [item["caption"] for item in items]}


class Reconstruction(nn.Module):
    """The autoencoder's training forward with the posterior noise given: one module for DDP to wrap."""

    def __init__(self, model: AutoencoderKL) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.model.encode(images)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.model.decode(z), posterior


class AutoencoderTrainer:
    """The LDM recipe: the autoencoder minimises rec + KL (+ adaptive GAN); the discriminator, hinge loss."""

    def __init__(self, config: TrainVaeConfig, holdout: ImageFolderDataset, device: torch.device, dist: DistInfo = DistInfo(),
                 init_weights: dict[str, torch.Tensor] | None = None) -> None:
        train = config.train
        self.config, self.device, self.holdout, self.dist = config, device, holdout, dist
        self.precision = resolve_precision(train.precision, device)
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        lpips = None
        if config.loss.perceptual_weight > 0:
            lpips = load_lpips(config.loss.lpips_vgg_path, config.loss.lpips_heads_path).to(device, memory_format=self.memory_format)
        torch.manual_seed(train.seed)
        self.model = AutoencoderKL(config.autoencoder)
        if init_weights is not None:
            self.model.load_state_dict(init_weights)
        if config.loss.decoder_only:
            self.model.encoder.requires_grad_(False)
            self.model.quant_conv.requires_grad_(False)
        self.model.to(device, memory_format=self.memory_format)
        self.loss = AutoencoderLoss(config.loss, lpips)
        if dist.enabled and device.type == "cuda":  # batch statistics over the global batch, as one process sees it
            self.loss.discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(self.loss.discriminator)
        self.loss.to(device, memory_format=self.memory_format)
        self.reconstruction: nn.Module = Reconstruction(self.model)
        self.discriminator: nn.Module = self.loss.discriminator
        if dist.enabled:
            self.reconstruction = DistributedDataParallel(self.reconstruction)
            self.discriminator = DistributedDataParallel(self.discriminator)
        trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.opt_ae = build_optimizer([*trainable, self.loss.logvar], train)
        self.opt_disc = build_optimizer(self.loss.discriminator.parameters(), train)
        self.lr_schedule = build_lr_schedule(self.opt_ae, train)
        self._follow_lr()
        self.scaler = grad_scaler(self.precision, device)
        self.ema = EMA(self.model, train.ema_decay) if train.ema_decay else None

    def _follow_lr(self) -> None:
        """The discriminator steps at the autoencoder's scheduled learning rate."""
        for group in self.opt_disc.param_groups:
            group["lr"] = self.opt_ae.param_groups[0]["lr"]

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _posterior_noise(self, images: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """This process's slice of the global batch's posterior noise for (step, micro-batch)."""
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + step * 1009 + micro)
        local, factor = images.shape[0], self.model.downsampling_factor
        shape = (local * self.dist.world_size, self.config.autoencoder.latent_channels, images.shape[2] // factor, images.shape[3] // factor)
        noise = torch.randn(shape, generator=generator)
        return noise[self.dist.rank * local:(self.dist.rank + 1) * local].to(self.device, non_blocking=True)

    def _average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over processes (the gradient of the global batch's mean loss)."""
        if self.dist.enabled:
            torch.distributed.all_reduce(tensor)
            tensor /= self.dist.world_size
        return tensor

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor | float]:
        self.model.train()
        self.loss.train()
        accum = len(micro_batches)
        logs: dict[str, torch.Tensor] = {}  # device tensors: read by the loop only when it logs
        reconstructions, total = [], 0.0
        # the generator's GAN term must not reach the discriminator's gradients (its own step follows)
        self.loss.discriminator.requires_grad_(False)
        for micro, batch in enumerate(micro_batches):
            images = self._images(batch)
            with autocast(self.precision, self.device):
                recon, posterior = self.reconstruction(images, self._posterior_noise(images, step, micro))
                loss, parts = self.loss.generator_loss(images, recon, posterior, step, self.model.last_layer, average=self._average)
            self._backward(loss / accum)
            total = total + loss.detach().float() / accum
            reconstructions.append(recon.detach())
            for key, value in parts.items():
                logs[key] = logs.get(key, 0.0) + value.float() / accum
        self.loss.discriminator.requires_grad_(True)
        if self.loss.logvar.grad is not None:  # a parameter outside the DDP modules
            self._average(self.loss.logvar.grad)
        check_finite_loss(total, self.opt_ae, self.opt_disc)  # before the update: the weights stay as they were
        self._step(self.opt_ae)
        if self.loss.disc_active(step):
            for batch, recon in zip(micro_batches, reconstructions):
                with autocast(self.precision, self.device):
                    d_loss, parts = self.loss.discriminator_loss(self._images(batch), recon, step, self.discriminator)
                self._backward(d_loss / accum)
                for key, value in parts.items():
                    logs[key] = logs.get(key, 0.0) + value.float() / accum
            check_finite_loss(logs.get("disc_loss", 0.0), self.opt_disc)
            self._step(self.opt_disc)
        if self.scaler:
            self.scaler.update()
        self.lr_schedule.step()
        self._follow_lr()
        if self.ema:
            self.ema.update(self.model)
        logs["lr"] = torch.tensor(self.lr_schedule.get_last_lr()[0], device=self.device)
        logs["loss"] = logs.pop("total_loss", logs.get("nll_loss", 0.0))
        return logs

    def eval_model(self) -> AutoencoderKL:
        """The weights to evaluate and ship: EMA when enabled."""
        return self.model if self.ema is None else self.ema.averaged(self.model)

    def _holdout_batches(self):
        count = min(len(self.holdout), self.config.train.eval_batches * self.config.train.batch_size)
        return DataLoader(Subset(self.holdout, range(count)), batch_size=self.config.train.batch_size, collate_fn=collate_images)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        model = self.eval_model().eval()
        scores = {"psnr": [], "ssim": []}
        for batch in self._holdout_batches():
            images = self._images(batch)
            with autocast(self.precision, self.device):
                recon = model.decode(model.encode(images).mode())
            recon = recon.float().clamp(-1, 1)
            scores["psnr"].append(psnr(recon, images.float()))
            scores["ssim"].append(ssim(recon, images.float()))
        return {name: float(torch.cat(values).mean()) for name, values in scores.items() if values}

    @torch.no_grad()
    def write_images(self, step: int, path: Path) -> None:
        model = self.eval_model().eval()
        images = collate_images([self.holdout[i] for i in range(min(8, len(self.holdout)))])["image"].to(self.device)
        with autocast(self.precision, self.device):
            recon = model.decode(model.encode(images).mode()).float()
        pairs = torch.stack([images.float(), recon], dim=1).flatten(0, 1)  # input | output side by side
        save_image(make_grid(pairs, columns=4, scale=max(1, 128 // images.shape[-1])), path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "loss": {k: v for k, v in self.loss.state_dict().items() if not k.startswith("lpips.")},
            "opt_ae": optimizer_state(self.opt_ae),
            "opt_disc": optimizer_state(self.opt_disc),
            "lr_schedule": self.lr_schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss.load_state_dict(state["loss"], strict=False)
        load_optimizer_state(self.opt_ae, state["opt_ae"])
        load_optimizer_state(self.opt_disc, state["opt_disc"])
        if "lr_schedule" in state:  # a checkpoint without one trained at the constant rate
            self.lr_schedule.load_state_dict(state["lr_schedule"])
        self._follow_lr()
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])


@torch.no_grad()
def estimate_latent_scale(model: AutoencoderKL, dataset: ImageFolderDataset, device: torch.device, max_images: int = 512, batch_size: int = 32) -> float:
    """1 / std of posterior samples over a sample of the data (how SD's 0.18215 was chosen)."""
    model.eval()
    generator = torch.Generator(device).manual_seed(0)
    count = min(len(dataset), max_images)
    latents = [
        model.encode(batch["image"].to(device)).sample(generator).float()
        for batch in DataLoader(Subset(dataset, range(count)), batch_size=batch_size, collate_fn=collate_images)
    ]
    return float(1.0 / torch.cat(latents).std())


def train_autoencoder(config: TrainVaeConfig, out: Path, overrides: list[str], resume: bool = False, device_name: str = "auto",
                      init_from: Path | None = None) -> Path:
    """Train (or resume) an autoencoder run in `out`, optionally fine-tuning `init_from`'s; returns the path of its bundle."""
    if config.data.buckets:
        raise ConfigError("data.buckets is for `ldm encode`; train-vae trains on square crops (data.resolution, data.crop)")
    base = None
    if init_from is not None:  # fine-tuning keeps the base autoencoder's architecture
        base = load_autoencoder(init_from)
        config.autoencoder = base.model.config
    elif config.loss.decoder_only:
        raise ConfigError("loss.decoder_only=true freezes a trained encoder: pass --init-from MODEL")
    device = resolve_device(device_name)
    with distributed(device, config.train.dist_timeout_minutes) as dist, deterministic_kernels(config.train.deterministic):
        return _train_autoencoder(config, Path(out), overrides, resume, device_for(device, dist), dist, base)


def _train_autoencoder(config: TrainVaeConfig, out: Path, overrides: list[str], resume: bool, device: torch.device, dist: DistInfo,
                       base: LoadedAutoencoder | None) -> Path:
    # decides without writing (a failed start leaves --out untouched); every process reads the same directory
    opened = on_main(dist, lambda: open_run(out, "train-vae", config, overrides, resume))
    config, _ = opened if dist.is_main else open_run(out, "train-vae", config, overrides, resume)
    data = config.data
    train_set = ImageFolderDataset.from_config(data, split="train", seed=config.train.seed)
    holdout = ImageFolderDataset.from_config(data, split="holdout", seed=config.train.seed)
    if len(holdout) == 0:
        holdout = train_set  # a one-image dataset has no held-out split
    trainer = AutoencoderTrainer(config, holdout, device, dist, base.model.state_dict() if base else None)
    lock = on_main(dist, lambda: claim_run(out, "train-vae", config))  # everything is checked: only now is --out written
    try:
        train_loop(trainer, train_set, config.train, out, dist, collate=collate_images, description="train-vae")
        bundle = on_main(dist, lambda: _write_bundle(trainer, train_set, config, out, device, base))
    finally:
        if lock is not None:
            lock.release()
    return bundle if bundle is not None else out / "bundle"


def _write_bundle(trainer: AutoencoderTrainer, train_set: ImageFolderDataset, config: TrainVaeConfig, out: Path, device: torch.device,
                  base: LoadedAutoencoder | None = None) -> Path:
    final_model = trainer.eval_model()
    metrics = trainer.evaluate(config.train.max_steps)
    # a frozen encoder keeps the base's latent space, scale included
    keep_scale = base is not None and config.loss.decoder_only
    latent_scale = base.latent_scale if keep_scale else estimate_latent_scale(final_model, train_set, device)
    latent_shift = base.latent_shift if keep_scale else 0.0
    weights = final_model.state_dict()
    bundle = write_bundle(
        out / "bundle",
        "autoencoder",
        {"autoencoder": weights},
        {
            "autoencoder": to_dict(config.autoencoder),
            "latent_scale": latent_scale,
            "latent_shift": latent_shift,
            "latent_space_hash": latent_space_hash(weights, latent_scale, latent_shift),
            "resolution": config.data.resolution,
            "holdout_metrics": metrics,
            "trained_steps": config.train.max_steps,
            "bad_images": len(train_set.bad_files),
        },
    )
    if train_set.bad_files:
        print(f"warning: skipped {len(train_set.bad_files)} unreadable image(s): {', '.join(train_set.bad_files[:5])}")
    return bundle.path
