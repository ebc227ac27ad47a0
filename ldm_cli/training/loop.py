"""The training loop both stages share: batches, progress, logging, evaluation, checkpoints, resume.

A stage supplies a `Trainer` (what one optimisation step is, what its state is, how to evaluate and
draw images); this loop does everything around it, the same way for the autoencoder and the U-Net.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.errors import LdmError
from ldm_cli.training.batches import EpochBatches
from ldm_cli.training.distributed import DistInfo, barrier
from ldm_cli.training.logger import MetricsLogger
from ldm_cli.training.trackers import Trackers


class Trainer(Protocol):
    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> dict[str, torch.Tensor | float]:
        """One optimiser step over `grad_accum_steps` micro-batches; returns scalar metrics, as 0-d device
        tensors where they are computed (the loop reads them only every `log_every` steps: no host sync)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics (deterministic)."""

    def write_images(self, step: int, path: Path) -> None:
        """A PNG grid showing progress (reconstructions or samples)."""


class TrainingInterrupted(LdmError):
    exit_code = 130


def train_loop(
    trainer: Trainer,
    dataset: Dataset,
    config: Any,  # TrainConfig
    run_dir: Path,
    dist: DistInfo = DistInfo(),
    collate: Callable | None = None,
    description: str = "train",
) -> int:
    """Run (or resume) training until `config.max_steps`; returns the final step."""
    checkpoints = CheckpointManager(run_dir, config.keep_last)
    step, epoch, batch_in_epoch = 0, 0, 0
    latest = checkpoints.latest()
    if latest is not None:
        state = checkpoints.load(latest)
        trainer.load_state_dict(state["trainer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        if dist.is_main:
            tqdm.write(f"resuming from {latest} (step {step})")
    logger = MetricsLogger(run_dir, enabled=dist.is_main, resume_step=step if latest else None,
                           tensorboard="tensorboard" in config.log_with)
    trackers = Trackers(config.log_with, run_dir, enabled=dist.is_main)
    batches = EpochBatches(len(dataset), config.batch_size, config.seed, dist)
    steps_per_epoch = len(batches) // config.grad_accum_steps
    if steps_per_epoch == 0:
        raise LdmError(
            f"one epoch has {len(batches)} batches, fewer than train.grad_accum_steps={config.grad_accum_steps}; lower it or train.batch_size"
        )

    def save() -> None:
        if dist.is_main:
            checkpoints.save(step, {
                "trainer": trainer.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "torch_rng": torch.get_rng_state(),
            })
        barrier(dist)

    progress = tqdm(total=config.max_steps, initial=step, desc=description, disable=not dist.is_main, dynamic_ncols=True)
    last_saved = step
    try:
        while step < config.max_steps:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            order = batches.epoch(epoch)[batch_in_epoch:]
            usable = len(order) - len(order) % config.grad_accum_steps
            loader = DataLoader(dataset, batch_sampler=order[:usable], num_workers=config.num_workers, collate_fn=collate)
            micro_batches: list[dict[str, Any]] = []
            for batch in loader:
                micro_batches.append(batch)
                if len(micro_batches) < config.grad_accum_steps:
                    continue
                metrics = trainer.train_step(micro_batches, step)
                micro_batches = []
                step += 1
                batch_in_epoch += config.grad_accum_steps
                progress.update(1)
                if step % config.log_every == 0 or step == config.max_steps:
                    metrics = {k: float(v) for k, v in metrics.items()}
                    progress.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "rec", "psnr")})
                    logger.log(step, metrics, "train/")
                    trackers.log(step, metrics, "train/")
                if dist.is_main and (step % config.eval_every == 0 or step == config.max_steps):
                    held_out = trainer.evaluate(step)
                    logger.log(step, held_out, "eval/")
                    trackers.log(step, held_out, "eval/")
                if dist.is_main and (step % config.image_every == 0 or step == config.max_steps):
                    image = run_dir / "images" / f"step_{step:07d}.png"
                    trainer.write_images(step, image)
                    trackers.log_image(step, image)
                if step % config.checkpoint_every == 0:
                    save()
                    last_saved = step
                if step >= config.max_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    except KeyboardInterrupt:
        progress.close()
        save()
        raise TrainingInterrupted(
            f"interrupted at step {step}; checkpoint saved in {checkpoints.directory} — run the same command again to resume"
        ) from None
    finally:
        progress.close()
        logger.close()
        trackers.close()
    if step != last_saved or checkpoints.latest() is None:
        save()
    return step
