"""`ldm train-diffusion`: one U-Net step on cached latents, plugged into the shared training loop.

Randomness (latent samples, timesteps, noise, caption dropout) is drawn per (seed, step,
micro-batch) for the whole global batch and sliced per process, so a resumed run and a
`torchrun` run see exactly the draws a single uninterrupted process would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ldm_cli.atomic import atomic_file
from ldm_cli.autoencoder.load import LoadedAutoencoder, load_autoencoder, shares_latent_space
from ldm_cli.backends.cpu import optimize_for_cpu
from ldm_cli.config import TrainDiffusionConfig, from_dict, to_dict
from ldm_cli.data.buckets import BucketBatches
from ldm_cli.data.tags import augment_tags
from ldm_cli.diffusion.load import load_latent_diffusion, text_encoder_config, write_latent_diffusion_bundle
from ldm_cli.diffusion.loss import diffusion_loss
from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldm_cli.diffusion.text import TextEncoder, load_text_encoder
from ldm_cli.diffusion.unet import UNet
from ldm_cli.errors import IncompatibleError, RunDirError
from ldm_cli.grid import labelled_grid, save_image
from ldm_cli.latents.dataset import LatentDataset, collate_latents
from ldm_cli.sampling.denoiser import Denoiser, get_sigmas
from ldm_cli.sampling.guidance import guide
from ldm_cli.sampling.samplers import sample_ddim
from ldm_cli.training.batches import EpochBatches
from ldm_cli.training.distributed import DistInfo, device_for, distributed, on_main
from ldm_cli.training.ema import EMA
from ldm_cli.training.loop import check_finite_loss, train_loop
from ldm_cli.training.master_weights import MasterWeights
from ldm_cli.training.optim import build_lr_schedule, build_optimizer
from ldm_cli.training.optimizer_state import load_optimizer_state, optimizer_state
from ldm_cli.training.precision import autocast, deterministic_kernels, grad_scaler, resolve_device, resolve_precision
from ldm_cli.training.run_dir import claim_run, open_run, saved_config

AUTOENCODER_RECORD = "autoencoder.json"  # in a run started with --vae: that autoencoder's path


class TextConditioning:
    """Caption → embedding: from the latent dataset's cache when it was made with this encoder,
    else from the frozen encoder, memoised (captions repeat every epoch).

    The memo lives in host memory (up to 50,000 x [77, 768] float32 is 12 GB with CLIP-L, too much
    for a GPU); each batch's embeddings travel to the device through pinned memory."""

    def __init__(self, encoder: TextEncoder, device: torch.device, cached_uncond: torch.Tensor | None = None) -> None:
        self.encoder, self.device, self.memo = encoder, device, {}
        self.use_cache = cached_uncond is not None
        self.uncond = cached_uncond.to(device).float() if self.use_cache else self.encode([""])[0]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def encode(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.memo]
        if missing:
            if len(self.memo) > 50_000:  # bound the memory on huge caption sets
                self.memo.clear()
            self.memo.update(zip(missing, self.encoder.encode(missing).float().cpu()))
        return self._to_device(torch.stack([self.memo[c] for c in captions]))

    def __call__(self, batch: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
        """Embeddings for a batch, with dropped captions replaced by the empty prompt's."""
        context = self._to_device(batch["text"]).float() if self.use_cache else self.encode(batch["caption"])
        return torch.where(keep.view(-1, 1, 1), context, self.uncond.expand_as(context))


class DiffusionTrainer:
    def __init__(
        self,
        config: TrainDiffusionConfig,
        data: LatentDataset,
        autoencoder: LoadedAutoencoder,
        conditioning: TextConditioning,
        device: torch.device,
        dist: DistInfo,
        init_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        train = config.train
        self.config, self.data, self.autoencoder, self.conditioning = config, data, autoencoder, conditioning
        self.device, self.dist = device, dist
        self.precision = resolve_precision(train.precision, device)
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        self.schedule = NoiseSchedule(config.schedule).to(device)
        torch.manual_seed(train.seed)
        self.unet = UNet(config.unet)
        if device.type == "cpu":
            optimize_for_cpu(self.unet)  # CPU kernels; parameters and state-dict keys stay
        if init_weights is not None:
            self.unet.load_state_dict(init_weights)
        self.unet = self._adapt(self.unet)
        self.unet.to(device, memory_format=self.memory_format)
        # bf16 weights: the forward runs without autocast; the optimiser and EMA see float32 masters, or
        # without masters the bf16 weights themselves (adafactor rounds its updates stochastically)
        bf16_weights = train.bf16_weights and self.precision == "bf16"
        self.master = MasterWeights(self.unet) if bf16_weights and train.master_weights else None
        if bf16_weights and not self.master:
            self.unet.to(torch.bfloat16)
        self.input_dtype = torch.bfloat16 if bf16_weights else torch.float32
        self.autocast_precision = "fp32" if bf16_weights else self.precision
        self.model = DistributedDataParallel(self.unet) if dist.enabled else self.unet
        self.optimizer = build_optimizer(self._parameter_groups(), train)
        self.lr_schedule = build_lr_schedule(self.optimizer, train)
        self.scaler = grad_scaler(self.precision, device)
        self.ema = EMA(self.master or self.unet, train.ema_decay) if train.ema_decay else None
        self.latent_scale, self.latent_shift = data.latent_scale, data.latent_shift
        self.preview_prompts = config.objective.validation_prompts or dataset_prompts(data, train.seed)

    def _adapt(self, unet: UNet) -> UNet:
        """Where a subclass changes what is trained (train-lora adds adapters and freezes the rest)."""
        return unet

    def _parameters(self) -> list[torch.Tensor]:
        """What the optimiser updates: the U-Net's trainable parameters, or their float32 masters."""
        return self.master.parameters if self.master else [p for p in self.unet.parameters() if p.requires_grad]

    def _parameter_groups(self) -> list[torch.Tensor] | list[dict[str, Any]]:
        """The optimiser's parameters, or groups of them with their own learning rates (train-lora)."""
        return self._parameters()

    def _synchronise_gradients(self) -> None:
        """Where a subclass averages over processes the gradients of parameters outside the DDP-wrapped U-Net."""

    def _draws(self, batch: dict[str, Any], step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """This process's slice of the global batch's random draws for (step, micro-batch)."""
        generator = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + step * 1009 + micro)
        local, world = batch["mean"].shape[0], self.dist.world_size
        shape = (local * world, *batch["mean"].shape[1:])
        posterior_noise = torch.randn(shape, generator=generator)
        noise = torch.randn(shape, generator=generator)
        offset = torch.randn(shape[:2] + (1, 1), generator=generator)
        timesteps = torch.randint(0, self.schedule.num_train_timesteps, (shape[0],), generator=generator)
        keep = torch.rand(shape[0], generator=generator) >= self.config.objective.caption_dropout
        part = slice(self.dist.rank * local, (self.dist.rank + 1) * local)
        return tuple(t[part].to(self.device) for t in (posterior_noise, noise, offset, timesteps, keep))

    def _loss(self, model: torch.nn.Module, batch: dict[str, Any], draws: tuple[torch.Tensor, ...]) -> torch.Tensor:
        posterior_noise, noise, offset, timesteps, keep = draws
        mean, logvar = batch["mean"].to(self.device), batch["logvar"].to(self.device)
        x0 = (mean + torch.exp(0.5 * logvar) * posterior_noise - self.latent_shift) * self.latent_scale
        noise = noise + self.config.objective.offset_noise * offset  # offset noise (Guttenberg 2023)
        x_t = self.schedule.add_noise(x0, noise, timesteps).to(self.input_dtype).contiguous(memory_format=self.memory_format)
        context = self.conditioning(batch, keep).to(self.input_dtype)
        with autocast(self.autocast_precision, self.device):
            prediction = model(x_t, timesteps, context)
        target = self.schedule.target(x0, noise, timesteps)
        return diffusion_loss(prediction.float(), target, timesteps, self.schedule, self.config.objective.min_snr_gamma)

    def _augment_captions(self, batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
        """Tag shuffling/dropout, drawn per (seed, step, micro-batch, item): the same on every process and after a resume."""
        objective = self.config.objective
        if not (objective.shuffle_tags or objective.tag_dropout):
            return batch
        seed = self.config.train.seed
        captions = [
            augment_tags(caption, np.random.default_rng([seed, step, micro, int(index)]), objective.shuffle_tags,
                         objective.keep_tokens, objective.tag_dropout)
            for caption, index in zip(batch["caption"], batch["index"].tolist())
        ]
        return {**batch, "caption": captions}

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor | float]:
        self.model.train()
        total = torch.zeros((), device=self.device)
        for micro, batch in enumerate(micro_batches):
            batch = self._augment_captions(batch, step, micro)
            loss = self._loss(self.model, batch, self._draws(batch, step, micro)) / len(micro_batches)
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if self.master:
                self.master.gradients_to_master()
            total += loss.detach()
        self._synchronise_gradients()
        check_finite_loss(total, self.optimizer)  # before the update: the weights stay as they were
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        logs = {}
        if self.config.train.grad_clip:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self._parameters(), self.config.train.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            self.master.copy_to_model()
        self.lr_schedule.step()
        if self.ema:
            self.ema.update(self.master or self.unet)
        return {"loss": total, **logs, "lr": self.lr_schedule.get_last_lr()[0]}

    def eval_unet(self) -> UNet:
        """The model to evaluate: EMA weights when enabled (in the U-Net's dtype)."""
        return self.unet if self.ema is None else self.ema.averaged(self.unet)

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained U-Net's state dict in float32 (from the masters under bf16_weights, if any)."""
        if self.master:
            return self.master.state_dict(self.unet)
        return {name: value.float() if value.is_floating_point() else value for name, value in self.unet.state_dict().items()}

    def shipped_weights(self) -> dict[str, torch.Tensor]:
        """The float32 weights a bundle ships: EMA when enabled."""
        return {**self.weights(), **(self.ema.shadow if self.ema else {})}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Loss at fixed timesteps and fixed noise on the first items: comparable across steps."""
        unet = self.eval_unet().eval()
        items = next(iter(self.data.buckets().values()))  # the most common shape
        count = min(len(items), self.config.train.eval_batches * self.config.train.batch_size)
        batch = collate_latents([self.data[i] for i in items[:count]])
        generator = torch.Generator().manual_seed(1234)
        results = {}
        for t in self.config.objective.validation_loss_timesteps:
            shape = batch["mean"].shape
            draws = (
                torch.zeros(shape), torch.randn(shape, generator=generator), torch.zeros(shape[:2] + (1, 1)),
                torch.full((count,), int(t), dtype=torch.long), torch.ones(count, dtype=torch.bool),
            )
            results[f"val_loss_t{t}"] = float(self._loss(unet, batch, tuple(d.to(self.device) for d in draws)))
        results["val_loss"] = sum(results.values()) / len(results)
        return results

    @torch.no_grad()
    def write_images(self, step: int, path: Path) -> None:
        """Validation prompts (or dataset captions) through a short DDIM run with classifier-free guidance,
        at the most common bucket's shape."""
        unet = self.eval_unet().eval()
        objective = self.config.objective
        prompts = [p for p in self.preview_prompts for _ in range(4)]
        context = self.conditioning.encode(prompts).to(self.device)
        uncond = self.conditioning.uncond.expand_as(context)
        scale = objective.validation_guidance_scale
        text = torch.cat([uncond, context])

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast(self.precision, self.device):
                both = unet(torch.cat([x, x]), torch.cat([t, t]), text).float()  # [uncond, cond] outputs
            return guide(*both.chunk(2), scale)

        denoise = Denoiser(guided, self.schedule)
        sigmas = get_sigmas(self.schedule, objective.validation_steps, spacing="trailing").to(self.device)
        generator = torch.Generator().manual_seed(0)
        shape = (len(prompts), *self.data.latent_shape)
        x = (torch.randn(shape, generator=generator) * sigmas[0].cpu()).to(self.device)
        latents = sample_ddim(denoise, x, sigmas)
        model = self.autoencoder.model
        images = model.decode(self.autoencoder.from_diffusion_space(latents).to(next(model.parameters()).dtype))
        scale_up = max(1, 96 // min(images.shape[-2:]))
        save_image(labelled_grid(images.float(), self.preview_prompts, columns=4, scale=scale_up), path)

    def state_dict(self) -> dict[str, Any]:
        return {
            "unet": self.weights(),
            "optimizer": optimizer_state(self.optimizer),
            "lr_schedule": self.lr_schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict(weights)
        if self.master:
            self.master.load_state_dict(weights)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_weights(state["unet"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])


def check_compatible(config: TrainDiffusionConfig, data: LatentDataset, text_width: int, overrides: list[str]) -> None:
    """Make the pieces fit before the first step: follow the data and the encoder where the user
    did not choose otherwise, and name both sides where they did."""
    unet = config.unet
    channels = data.latent_shape[0]
    explicit = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    for key, needed in (("in_channels", channels), ("out_channels", channels), ("cross_attention_dim", text_width)):
        have = getattr(unet, key)
        if have != needed:
            if f"unet.{key}" in explicit:
                side = "the latents have" if key != "cross_attention_dim" else "the text encoder's width is"
                raise IncompatibleError(f"unet.{key}={have} but {side} {needed}; drop the override or set unet.{key}={needed}")
            setattr(unet, key, needed)
    factor = unet.downsample_factor
    for _, height, width in data.buckets():
        if height % factor or width % factor:
            raise IncompatibleError(
                f"latents are {height}x{width} but the U-Net downsamples by {factor}; use a U-Net with fewer levels "
                f"or images whose latent side is a multiple of {factor} (with buckets: a data.bucket_step of "
                f"{factor} latent cells)"
            )


def check_text_cache(data: LatentDataset, latents: Path, objective: Any) -> None:
    """Cached text embeddings hold the fixed captions: tag augmentation needs the captions encoded live."""
    if data.text_info is not None and (objective.shuffle_tags or objective.tag_dropout):
        raise IncompatibleError(
            f"objective.shuffle_tags/tag_dropout change captions every step, but {latents} holds cached text embeddings "
            "of the fixed captions; re-encode without --cache-text (the raw captions are kept)"
        )


def check_base_autoencoder(data: LatentDataset, latents: Path, base: Any, base_path: Path) -> None:
    """A base model (fine-tuning, LoRA) must decode the latents: the autoencoder they were encoded with,
    or a decoder-only fine-tune of it."""
    if not shares_latent_space(data.index["autoencoder"], base.autoencoder.bundle):
        raise IncompatibleError(
            f"latents in {latents} were encoded with autoencoder {data.autoencoder_hash[:12]}, but {base_path} uses "
            f"{base.autoencoder.bundle.content_hash[:12]}; encode with `ldm encode --vae {base_path}`"
        )


def train_unet(
    config: TrainDiffusionConfig,
    latents: Path,
    out: Path,
    overrides: list[str],
    resume: bool = False,
    device_name: str = "auto",
    init_from: Path | None = None,
    vae: Path | None = None,
) -> Path:
    """Train (or resume) a U-Net run in `out` on a latent dataset; returns the bundle path. The bundle
    carries `vae` (default: the autoencoder the latents were encoded with), which must share their latent space."""
    device = resolve_device(device_name)
    with distributed(device, config.train.dist_timeout_minutes) as dist, deterministic_kernels(config.train.deterministic):
        return _train_unet(config, latents, Path(out), overrides, resume, device_for(device, dist), dist, init_from, vae)


def _train_unet(
    config: TrainDiffusionConfig,
    latents: Path,
    out: Path,
    overrides: list[str],
    resume: bool,
    device: torch.device,
    dist: DistInfo,
    init_from: Path | None,
    vae: Path | None,
) -> Path:
    init_weights = None
    data = LatentDataset(latents)
    if init_from is not None:  # fine-tuning keeps the base model's architecture, schedule and encoder
        base = load_latent_diffusion(init_from)
        check_base_autoencoder(data, latents, base, init_from)
        config.unet, config.text_encoder = base.unet.config, text_encoder_config(base.bundle)
        config.schedule = from_dict(base.bundle.meta["schedule"], ScheduleConfig)
        init_weights = base.unet.state_dict()
    if vae is None:  # a resumed run ships the autoencoder it was started with
        vae = recorded_autoencoder(out)
    autoencoder = load_autoencoder(vae if vae is not None else data.autoencoder_path, device=device)
    if not shares_latent_space(data.index["autoencoder"], autoencoder.bundle):
        found = f"--vae {vae} is" if vae is not None else f"{data.autoencoder_path} now holds"
        remedy = ("pass that autoencoder or a decoder-only fine-tune of it (loss.decoder_only=true)" if vae is not None
                  else "re-encode with `ldm encode`")
        raise IncompatibleError(
            f"latents in {latents} were encoded with autoencoder {data.autoencoder_hash[:12]}, but {found} "
            f"{autoencoder.bundle.content_hash[:12]}, with another encoder or latent scale; {remedy}"
        )
    saved = saved_config(out, TrainDiffusionConfig) if resume else None
    if saved is not None and not any(o.split("=", 1)[0].lstrip("+~") == "text_encoder" for o in overrides):
        config.text_encoder = saved.text_encoder  # --resume continues with the run's own text encoder
    text_encoder = load_text_encoder(config.text_encoder, device=device)
    check_compatible(config, data, text_encoder.width, overrides)
    # decides without writing (a failed start leaves --out untouched); every process reads the same directory
    opened = on_main(dist, lambda: open_run(out, "train-diffusion", config, overrides, resume))
    config, _ = opened if dist.is_main else open_run(out, "train-diffusion", config, overrides, resume)
    check_text_cache(data, latents, config.objective)
    cached = _cache_matches(data, config)
    conditioning = TextConditioning(text_encoder, device, data.uncond_text() if cached else None)
    trainer = DiffusionTrainer(config, data, autoencoder, conditioning, device, dist, init_weights)
    lock = on_main(dist, lambda: claim_run(out, "train-diffusion", config))  # everything is checked: only now is --out written
    try:
        if vae is not None and dist.is_main:
            record_autoencoder(out, vae)
        train_loop(trainer, data, config.train, out, dist, collate=collate_latents, description="train-diffusion",
                   batches=batch_order(data, config.train, dist))
        bundle = on_main(dist, lambda: write_latent_diffusion_bundle(
            out / "bundle",
            trainer.shipped_weights(),
            config.unet,
            config.schedule,
            config.text_encoder,
            text_encoder,
            autoencoder.bundle,
            {"trained_steps": config.train.max_steps, "validation": trainer.evaluate(config.train.max_steps), "latents": str(latents)},
        ))
    finally:
        if lock is not None:
            lock.release()
    return bundle.path if bundle is not None else out / "bundle"


def record_autoencoder(out: Path, vae: Path) -> None:
    """Remember `--vae` in the run, so that resuming without it ships the same autoencoder."""
    with atomic_file(out / AUTOENCODER_RECORD, "w") as handle:
        json.dump({"path": str(Path(vae).resolve())}, handle)


def recorded_autoencoder(out: Path) -> Path | None:
    """The `--vae` a run in `out` was started with; None when it used its latents' autoencoder."""
    record = Path(out) / AUTOENCODER_RECORD
    if not record.is_file():
        return None
    try:
        return Path(json.loads(record.read_text())["path"])
    except (ValueError, KeyError, TypeError) as error:
        raise RunDirError(f"{record} is damaged ({error!r}); pass --vae with the autoencoder the run should carry") from None


def dataset_prompts(data: LatentDataset, seed: int, count: int = 4, scan: int = 1000) -> list[str]:
    """Up to `count` distinct non-empty captions of the most common bucket, picked with `seed`."""
    items = next(iter(data.buckets().values()))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:scan].tolist()
    prompts = list(dict.fromkeys(caption for caption in (data.caption(items[i]) for i in order) if caption))[:count]
    return prompts or [""]


def batch_order(data: LatentDataset, train: Any, dist: DistInfo) -> EpochBatches | BucketBatches:
    """One bucket (every square set): plain shuffled batches; several: batches that never mix shapes."""
    groups = list(data.buckets().values())
    if len(groups) == 1:
        return EpochBatches(len(data), train.batch_size, train.seed, dist)
    return BucketBatches(groups, train.batch_size, train.seed, dist)


def _cache_matches(data: LatentDataset, config: TrainDiffusionConfig) -> bool:
    """Cached text embeddings are usable only if they came from the same encoder settings."""
    info = data.text_info
    return bool(info) and info["config"] == to_dict(config.text_encoder)
