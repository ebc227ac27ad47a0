"""Hydra YAML + command-line overrides → typed config objects. The one place configs are built.

Each command has a primary YAML in `configs/` (e.g. `train_vae.yaml`) whose defaults list picks one
option per group (`autoencoder/`, `data/`, `train/`, ...). We compose it with Hydra's compose API,
merge it onto the command's dataclass schema (so a mistyped key or a bad value fails before any
work), and return dataclasses. Every composition failure becomes one `ConfigError` line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm_cli.adapters.config import LoraConfig
from ldm_cli.autoencoder.loss import AutoencoderLossConfig
from ldm_cli.autoencoder.model import AutoencoderConfig
from ldm_cli.data.images import DataConfig
from ldm_cli.diffusion.schedule import ScheduleConfig
from ldm_cli.diffusion.text import TextEncoderConfig
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.training.distributed import DEFAULT_TIMEOUT_MINUTES
from ldm_cli.errors import ConfigError
from ldm_cli.training.optim import LR_SCHEDULES, OPTIMIZERS

CONFIG_DIR = Path(__file__).parent / "configs"

Schema = TypeVar("Schema")


@dataclass
class TrainConfig:
    """What both trainers share: steps, optimiser, precision, EMA, logging and checkpoints."""

    max_steps: int = 1000
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw (fused) | adafactor (fixed lr, low memory) | adamw8bit (bitsandbytes)
    lr_schedule: str = "constant"  # after warmup_steps: constant | cosine | linear | cosine_with_restarts
    lr_schedule_steps: Optional[int] = None  # steps the schedule spans; None: max_steps
    lr_cycles: int = 1  # cosine_with_restarts: number of hard restarts
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA, with a grad scaler)
    # train-diffusion, when the precision is bf16: the U-Net itself in bf16 with float32 master weights
    # (training/master_weights.py) instead of autocast
    bf16_weights: bool = False
    # with bf16_weights: false drops the float32 masters and adafactor updates the bf16 weights in place
    # with stochastic rounding (training/adafactor.py), which halves the weights' and gradients' memory
    master_weights: bool = True
    channels_last: bool = True
    ema_decay: Optional[float] = None  # e.g. 0.9999; None disables EMA
    seed: int = 0
    num_workers: Optional[int] = 0  # null: as many as cores available (at most 4)
    max_nonfinite_steps: int = 0  # NaN/Inf-loss steps to skip (no update) before stopping; 0 stops at the first
    log_every: int = 10
    image_every: int = 200  # sample / reconstruction grids
    eval_every: int = 200  # held-out metrics
    eval_batches: int = 4
    checkpoint_every: int = 500
    keep_last: int = 3
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb (both allowed) or none
    # torchrun: how long a process waits in a collective (rank 0 evaluates and saves alone meanwhile)
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    # bitwise-reproducible GPU kernels (torch.use_deterministic_algorithms): exact resume on CUDA, slower
    deterministic: bool = False


@dataclass
class DiffusionObjectiveConfig:
    """The diffusion-specific parts of training: target weighting, conditioning dropout, validation."""

    caption_dropout: float = 0.1  # so classifier-free guidance has an unconditional model
    min_snr_gamma: Optional[float] = None  # 5.0 is the paper's choice
    offset_noise: float = 0.0
    # tag captions ("a, b, c"), augmented per step: needs live text encoding (latents without --cache-text)
    shuffle_tags: bool = False
    keep_tokens: int = 0  # the first N tags stay in place
    tag_dropout: float = 0.0  # each other tag is dropped with this probability
    validation_prompts: list[str] = field(default_factory=list)  # empty: 4 captions drawn from the dataset (seeded)
    validation_steps: int = 25
    validation_guidance_scale: float = 5.0
    validation_loss_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])


@dataclass
class TrainVaeConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)


@dataclass
class TrainDiffusionConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: DiffusionObjectiveConfig = field(default_factory=DiffusionObjectiveConfig)


@dataclass
class TrainLoraConfig(TrainDiffusionConfig):
    """`train-lora`: unet, schedule and text_encoder are the base model's (filled in from --base)."""

    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EncodeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    batch_size: int = 16
    shard_size: int = 1024  # images per shard file
    flip: bool = False  # also store a horizontally flipped copy of each image
    precision: str = "auto"
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: how long a process waits in a collective


@dataclass
class SampleConfig:
    """Sampling knobs beyond the command-line options."""

    karras_sigmas: bool = False
    timestep_spacing: str = "trailing"  # leading | trailing | linspace | exponential
    tile_decode_above: int = 1024  # decode in tiles when the image side exceeds this many pixels
    tile_latent_size: int = 64
    compile: bool = False  # torch.compile the U-Net: a one-time compilation, then faster steps (docs/benchmarks.md)
    # bounds on untrusted sizes and counts (options, replayed PNG metadata); raise them for big jobs
    max_steps: int = 1000
    max_side: int = 4096
    max_batch_size: int = 256


SCHEMAS: dict[str, type] = {
    "train_vae": TrainVaeConfig,
    "train_diffusion": TrainDiffusionConfig,
    "train_lora": TrainLoraConfig,
    "encode": EncodeConfig,
    "sample": SampleConfig,
}


def _one_line(error: Exception) -> str:
    """Hydra and OmegaConf messages span several lines (search paths, full keys); keep the gist."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for line in lines[1:]:
        if line.startswith("Available options"):
            text += " (" + line.rstrip(":") + ": " + ", ".join(_options_after(lines, line)) + ")"
        if line.startswith("full_key:") and "full_key" not in text:
            text += f" [{line}]"
    return text


def _options_after(lines: list[str], header: str) -> list[str]:
    start = lines.index(header) + 1
    options = []
    for line in lines[start:]:
        if line.startswith("Config search path") or ":" in line:
            break
        options.append(line)
    return options


def compose(
    name: str,
    overrides: list[str] | None = None,
    config_dir: str | Path | None = None,
) -> DictConfig:
    """Compose `configs/<name>.yaml` with Hydra; `config_dir` adds a user's own config tree to the search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    if config_dir is not None:
        user_dir = Path(config_dir).expanduser().resolve()
        if not user_dir.is_dir():
            raise ConfigError(f"config directory {user_dir} does not exist")
        overrides.insert(0, f"hydra.searchpath=[file://{user_dir}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return hydra_compose(config_name=name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from error
    finally:
        GlobalHydra.instance().clear()


def to_schema(raw: DictConfig | dict, schema: type[Schema]) -> Schema:
    """Validate a composed config against a dataclass schema and return the dataclass."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from error


def load_config(
    name: str,
    overrides: list[str] | None = None,
    config_dir: str | Path | None = None,
) -> Any:
    """Compose and validate the config of one command (`name` is a key of SCHEMAS)."""
    config = to_schema(compose(name, overrides, config_dir), SCHEMAS[name])
    validate(config)
    return config


def apply_overrides(config: Schema, overrides: list[str]) -> Schema:
    """Apply `key=value` overrides to an existing config (used when resuming a saved run)."""
    try:
        patch = OmegaConf.from_dotlist([o.lstrip("+") for o in overrides])
        merged = OmegaConf.merge(OmegaConf.structured(config), patch)
    except OmegaConfBaseException as error:
        raise ConfigError(_one_line(error)) from error
    except Exception as error:  # OmegaConf's dotlist parser raises assorted types
        raise ConfigError(f"bad override in {overrides}: {error}") from error
    return to_schema(merged, type(config))


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict, schema: type[Schema]) -> Schema:
    return to_schema(OmegaConf.create(data), schema)


def validate(config: Any) -> None:
    """Value checks that types alone cannot express; each failure is one line naming the key."""
    train = getattr(config, "train", None)
    if train is not None:
        _check(train.max_steps > 0, "train.max_steps", "a positive integer", train.max_steps)
        _check(train.batch_size > 0, "train.batch_size", "a positive integer", train.batch_size)
        _check(train.grad_accum_steps > 0, "train.grad_accum_steps", "a positive integer", train.grad_accum_steps)
        _check(train.lr > 0, "train.lr", "a positive number", train.lr)
        _check(train.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", "auto, fp32, bf16 or fp16", train.precision)
        _check(train.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "a non-negative integer", train.max_nonfinite_steps)
        _check(train.num_workers is None or train.num_workers >= 0, "train.num_workers", "null or a non-negative integer", train.num_workers)
        _check(train.keep_last > 0, "train.keep_last", "a positive integer", train.keep_last)
        _check(train.dist_timeout_minutes > 0, "train.dist_timeout_minutes", "a positive number", train.dist_timeout_minutes)
        _check(train.ema_decay is None or 0 < train.ema_decay < 1, "train.ema_decay", "null or a number in (0, 1)", train.ema_decay)
        _check(train.optimizer in OPTIMIZERS, "train.optimizer", " | ".join(OPTIMIZERS), train.optimizer)
        _check(train.lr_schedule in LR_SCHEDULES, "train.lr_schedule", " | ".join(LR_SCHEDULES), train.lr_schedule)
        _check(train.lr_schedule_steps is None or train.lr_schedule_steps > 0, "train.lr_schedule_steps",
               "null or a positive integer", train.lr_schedule_steps)
        _check(train.lr_cycles > 0, "train.lr_cycles", "a positive integer", train.lr_cycles)
        _check(train.warmup_steps >= 0, "train.warmup_steps", "a non-negative integer", train.warmup_steps)
        _check(len(train.adam_betas) == 2, "train.adam_betas", "two numbers", train.adam_betas)
        from ldm_cli.training.trackers import check_log_with

        check_log_with(train.log_with)
        _check(not train.bf16_weights or train.precision in ("auto", "bf16"), "train.bf16_weights",
               "false unless train.precision is bf16 or auto", train.bf16_weights)
        _check(train.master_weights or (train.bf16_weights and train.optimizer == "adafactor"), "train.master_weights",
               "true unless train.bf16_weights=true and train.optimizer=adafactor (stochastic rounding)", train.master_weights)
    data = getattr(config, "data", None)
    if data is not None:
        _check(data.resolution > 0, "data.resolution", "a positive integer", data.resolution)
    timeout = getattr(config, "dist_timeout_minutes", None)  # encode's (the trainers' is under train.)
    if timeout is not None:
        _check(timeout > 0, "dist_timeout_minutes", "a positive number", timeout)
    objective = getattr(config, "objective", None)
    if objective is not None:
        _check(0 <= objective.caption_dropout < 1, "objective.caption_dropout", "a number in [0, 1)", objective.caption_dropout)
        _check(0 <= objective.tag_dropout < 1, "objective.tag_dropout", "a number in [0, 1)", objective.tag_dropout)
        _check(objective.keep_tokens >= 0, "objective.keep_tokens", "a non-negative integer", objective.keep_tokens)
    for part in dataclasses.fields(config):
        value = getattr(config, part.name)
        if hasattr(value, "validate"):
            value.validate()


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")
