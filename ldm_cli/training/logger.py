"""Metrics to `metrics.csv` (long format: step,name,value) and a TensorBoard event log."""

from __future__ import annotations

import csv
import time
import warnings
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        new_file = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.csv = csv.writer(self.file)
        if new_file:
            self.csv.writerow(["step", "name", "value", "time"])
        if not tensorboard:  # train.log_with without tensorboard
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        except ImportError:
            warnings.warn("tensorboard is not installed: metrics go to metrics.csv only", stacklevel=2)

    def _truncate_after(self, step: int) -> None:
        """A killed run logged steps past its last checkpoint; the resumed run logs them again."""
        with open(self.path, newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= step]
        with open(self.path, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        now = f"{time.time():.3f}"
        for name, value in metrics.items():
            self.csv.writerow([step, prefix + name, f"{float(value):.6g}", now])
            if self.writer is not None:
                self.writer.add_scalar(prefix + name, float(value), step)
        self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
