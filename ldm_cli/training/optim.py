"""The optimiser and learning-rate schedule both trainers build from `train.optimizer` / `train.lr_schedule`.

- adamw: torch's fused AdamW (one kernel over all tensors).
- adafactor: transformers' Adafactor with a fixed learning rate (relative_step and parameter scaling
  off): factored second moments and no first moment, the low-memory choice on any device. Its bf16
  parameters take each update with stochastic rounding (`training/adafactor.py`), so that bf16 weights can
  train without float32 master copies (`train.master_weights=false`).
- adamw8bit: bitsandbytes' AdamW8bit (block-wise 8-bit moments), where bitsandbytes imports.

Schedules are transformers' `get_scheduler` curves, written out (that module imports peft and
bitsandbytes, a second of start-up for every command): a `LambdaLR` (so its state resumes exactly)
with linear warm-up over `train.warmup_steps`, then constant, cosine, linear or cosine with
restarts over `train.lr_schedule_steps` (default `train.max_steps`).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Iterable

import torch

from ldm_cli.errors import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
LR_SCHEDULES = ("constant", "cosine", "linear", "cosine_with_restarts")


def build_optimizer(parameters: Iterable[torch.Tensor], train: Any, betas: tuple[float, float] | None = None) -> torch.optim.Optimizer:
    """`train.optimizer` over `parameters` at `train.lr` (a TrainConfig); `betas` default to train.adam_betas."""
    parameters = list(parameters)
    betas = tuple(betas or train.adam_betas)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=train.lr, betas=betas, weight_decay=train.weight_decay, fused=True)
    if train.optimizer == "adafactor":
        from ldm_cli.training.adafactor import Adafactor  # transformers' optimisation module imports slowly

        return Adafactor(parameters, lr=train.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=train.weight_decay)
    if train.optimizer == "adamw8bit":
        return _adamw8bit(parameters, train, betas)
    raise ConfigError(f"train.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {train.optimizer!r}")


def quiet_bitsandbytes() -> None:
    """Silence the warnings of bitsandbytes' import on AVX512-BF16 CPUs, where it tries to fetch its 4-bit
    CPU kernel from the hub (with the `kernels` package) and both log when that fails or is offline:
    neither its 8-bit AdamW nor LoRA (peft imports bitsandbytes) uses that kernel."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _adamw8bit(parameters: list[torch.Tensor], train: Any, betas: tuple[float, float]) -> torch.optim.Optimizer:
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except Exception as error:  # not installed, or its native library does not load on this machine
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"train.optimizer=adamw8bit needs bitsandbytes, which does not import here ({reason}); "
            "`pip install bitsandbytes`, or use train.optimizer=adafactor for low optimiser memory"
        ) from None
    return bitsandbytes.optim.AdamW8bit(parameters, lr=train.lr, betas=betas, weight_decay=train.weight_decay)


def lr_multiplier(step: int, schedule: str, warmup: int, total: int, cycles: int = 1) -> float:
    """The factor on the base learning rate at `step`: linear warm-up to 1 over `warmup` steps, then
    `schedule` over the steps from `warmup` to `total` (0 after `total`, except for constant)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if progress >= 1.0:  # cosine_with_restarts
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def build_lr_schedule(optimizer: torch.optim.Optimizer, train: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then `train.lr_schedule`, as a multiplier of each group's base learning rate."""
    if train.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {train.lr_schedule!r}")
    curve = partial(lr_multiplier, schedule=train.lr_schedule, warmup=train.warmup_steps,
                    total=train.lr_schedule_steps or train.max_steps, cycles=train.lr_cycles)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, curve)
