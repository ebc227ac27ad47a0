"""The training loop both stages share: batches, progress, logging, evaluation, checkpoints, resume.

A stage supplies a `Trainer` (what one optimisation step is, what its state is, how to evaluate and
draw images); this loop does everything around it, the same way for the autoencoder and the U-Net.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.errors import BundleError, LdmError, TrainingError
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


class NonFiniteLoss(Exception):
    """Raised by a trainer's step, before any optimiser update, when its loss is NaN or infinite."""

    def __init__(self, value: float) -> None:
        super().__init__(f"non-finite loss {value}")
        self.value = value


def check_finite_loss(value: float | torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
    """Drop the step's gradients and raise `NonFiniteLoss` unless `value` is finite (on every process
    of a distributed run, so that all of them stop or skip together)."""
    value = float(value)  # one host sync per step: the update must not happen on a NaN
    bad = not math.isfinite(value)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        bad = any_process(bad)
    if bad:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(value if not math.isfinite(value) else float("nan"))


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process of the initialised process group (one tiny all-reduce)."""
    cuda = torch.distributed.get_backend() == "nccl"
    value = torch.tensor([float(flag)], device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def default_workers(configured: int | None) -> int:
    """`train.num_workers: null` means as many DataLoader workers as cores available, at most 4."""
    if configured is not None:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (a cluster pre-empting the job, `kill`) end training at the next
    step boundary, so the checkpoint then saved is a consistent state; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.forced = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self.forced = True
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}


def train_loop(
    trainer: Trainer,
    dataset: Dataset,
    config: Any,  # TrainConfig
    run_dir: Path,
    dist: DistInfo = DistInfo(),
    collate: Callable | None = None,
    description: str = "train",
    batches: Any = None,  # EpochBatches or data/buckets.py's BucketBatches; default EpochBatches over the dataset
) -> int:
    """Run (or resume) training until `config.max_steps`; returns the final step."""
    checkpoints = CheckpointManager(run_dir, config.keep_last)
    step, epoch, batch_in_epoch, skipped = 0, 0, 0, 0
    latest = checkpoints.latest()
    if latest is not None:
        state = checkpoints.load(latest)
        try:
            trainer.load_state_dict(state["trainer"])
            step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
            torch.set_rng_state(state["torch_rng"])
            skipped = int(state.get("nonfinite_skipped", 0))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BundleError(
                f"checkpoint {latest} does not hold this run's training state ({type(error).__name__}: {reason}); "
                "delete it to resume from the one before"
            ) from error
        if dist.is_main:
            tqdm.write(f"resuming from {latest} (step {step})")
    logger = MetricsLogger(run_dir, enabled=dist.is_main, resume_step=step if latest else None,
                           tensorboard="tensorboard" in config.log_with)
    trackers = Trackers(config.log_with, run_dir, enabled=dist.is_main)
    batches = batches or EpochBatches(len(dataset), config.batch_size, config.seed, dist)
    steps_per_epoch = len(batches) // config.grad_accum_steps
    if steps_per_epoch == 0:
        raise LdmError(
            f"one epoch has {len(batches)} batches, fewer than train.grad_accum_steps={config.grad_accum_steps}; lower it or train.batch_size"
        )

    def save() -> None:
        if dist.is_main:
            checkpoints.save(step, {
                "trainer": trainer.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "torch_rng": torch.get_rng_state(), "nonfinite_skipped": skipped,
            })
            if hasattr(trainer, "export"):  # a product written with each checkpoint (train-lora's LoRA file)
                trainer.export(step)
        barrier(dist)

    progress = tqdm(total=config.max_steps, initial=step, desc=description, disable=not dist.is_main, dynamic_ncols=True)
    last_saved = step
    workers = default_workers(config.num_workers)
    stop = _StopSignals()
    try:
        stop.__enter__()
        while step < config.max_steps:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            order = batches.epoch(epoch)[batch_in_epoch:]
            usable = len(order) - len(order) % config.grad_accum_steps
            loader = DataLoader(dataset, batch_sampler=order[:usable], num_workers=workers, collate_fn=collate)
            micro_batches: list[dict[str, Any]] = []
            for batch in loader:
                if stop.received and not dist.enabled:
                    raise KeyboardInterrupt
                micro_batches.append(batch)
                if len(micro_batches) < config.grad_accum_steps:
                    continue
                try:
                    metrics = trainer.train_step(micro_batches, step)
                except NonFiniteLoss as bad:
                    skipped += 1
                    if skipped > config.max_nonfinite_steps:
                        raise TrainingError(stop_message(step + 1, bad.value, checkpoints, config.max_nonfinite_steps)) from None
                    tqdm.write(f"warning: step {step + 1}: loss is {bad.value}, update skipped "
                               f"({skipped} of train.max_nonfinite_steps={config.max_nonfinite_steps})")
                    metrics = {}
                micro_batches = []
                step += 1
                batch_in_epoch += config.grad_accum_steps
                progress.update(1)
                if metrics and (step % config.log_every == 0 or step == config.max_steps):
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
                # every process stops at the same step boundary, whichever received the signal
                if any_process(stop.received is not None) if dist.enabled else stop.received:
                    raise KeyboardInterrupt
                if step >= config.max_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    except KeyboardInterrupt:
        progress.close()
        if stop.forced:  # stopped mid-step: the state in memory may be half-updated, so nothing is saved
            latest = checkpoints.latest()
            raise TrainingInterrupted(
                f"stopped at once during step {step + 1}; nothing saved, the last checkpoint is {latest or 'none'}"
            ) from None
        if step != last_saved:
            save()
        how = "terminated (SIGTERM)" if stop.received == "SIGTERM" else "interrupted"  # (or told by another process)
        raise TrainingInterrupted(
            f"{how} at step {step}; checkpoint saved in {checkpoints.directory} — run the same command again to resume"
        ) from None
    finally:
        stop.__exit__()
        progress.close()
        logger.close()
        trackers.close()
    if step != last_saved or checkpoints.latest() is None:
        save()
    return step


def stop_message(step: int, value: float, checkpoints: CheckpointManager, limit: int) -> str:
    latest = checkpoints.latest()
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    allowed = f" after {limit} skipped step(s)" if limit else ""
    return (
        f"training stopped: the loss is {value} at step {step}{allowed}; {kept} (nothing non-finite was saved); "
        "lower train.lr or set train.grad_clip and run again, or let train.max_nonfinite_steps skip such steps"
    )
