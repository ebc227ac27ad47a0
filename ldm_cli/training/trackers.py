"""Experiment trackers beside `metrics.csv`, chosen by `train.log_with`.

`tensorboard` (the default) is written by MetricsLogger; `wandb` sends the same metrics, the
preview images and the run's composed config (`config.yaml`) to Weights & Biases (an optional
extra: `pip install 'ldm-cli[wandb]'`; `WANDB_MODE=offline` keeps the run on disk); `none` keeps
`metrics.csv` only. Only the main process tracks.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from ldm_cli.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "none")
RUN_ID_FILE = "wandb_run_id"  # a resumed run keeps logging into the same W&B run


def check_log_with(names: list[str]) -> None:
    """One line for an unknown tracker or `none` beside another one."""
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise ConfigError(
            f"train.log_with: expected one or more of tensorboard, wandb (or just none), got {list(names)!r}"
        )


class WandbTracker:
    """Metrics and preview images of one training run, as a W&B run stored under `run_dir/wandb/`."""

    def __init__(self, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.log_with includes wandb, but the wandb package is not installed: "
                "pip install 'ldm-cli[wandb]', or drop wandb from train.log_with"
            ) from None
        self.wandb = wandb
        config_file = run_dir / "config.yaml"
        composed = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ldm"),
            name=run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=composed,
            settings=wandb.Settings(quiet=True, console="off"),
        )

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        self.run.log({prefix + name: float(value) for name, value in metrics.items()}, step=step)

    def log_image(self, step: int, path: Path) -> None:
        if not path.is_file():  # a trainer with nothing to draw at this step
            return
        self.run.log({"images/preview": self.wandb.Image(str(path), caption=path.stem)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers `train.log_with` names besides TensorBoard, behind one log/log_image/close."""

    def __init__(self, names: list[str], run_dir: Path, enabled: bool = True) -> None:
        check_log_with(names)
        self.sinks: list[Any] = [WandbTracker(Path(run_dir))] if enabled and "wandb" in names else []

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        for sink in self.sinks:
            sink.log(step, metrics, prefix)

    def log_image(self, step: int, path: Path) -> None:
        for sink in self.sinks:
            sink.log_image(step, path)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
