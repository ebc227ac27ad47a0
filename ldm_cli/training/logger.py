"""Metrics to `metrics.csv` (long format: step,name,value,time) and a TensorBoard event log.

The CSV survives any kill: its header is flushed when the file is created, rows are appended and
flushed, and the one rewrite (dropping steps past the checkpoint a run resumes from) goes through
a temporary file and a rename. A log that is damaged anyway never blocks a resume: it is set
aside with a warning and a fresh one is started.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from ldm_cli.atomic import atomic_file

HEADER = ["step", "name", "value", "time"]


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = read_rows(self.path)
            if kept is None:
                aside = set_aside(self.path)
                tqdm.write(f"warning: {self.path} is damaged; moved it to {aside.name} and started a new log")
            elif resume_step is not None:
                rewrite(self.path, [row for row in kept if int(row[0]) <= resume_step])
        new_file = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.csv = csv.writer(self.file)
        if new_file:
            self.csv.writerow(HEADER)
            self.file.flush()
        if not tensorboard:  # train.log_with without tensorboard
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        except ImportError:
            warnings.warn("tensorboard is not installed: metrics go to metrics.csv only", stacklevel=2)

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


def read_rows(path: Path) -> list[list[str]] | None:
    """The data rows of a metrics log, or None when it is not one (empty, headerless, unreadable).

    A last row cut short by a kill is dropped; a malformed row elsewhere means damage.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not rows or rows[0] != HEADER:
        return None
    data = rows[1:]
    if data and not _valid(data[-1]):
        data = data[:-1]
    return data if all(_valid(row) for row in data) else None


def _valid(row: list[str]) -> bool:
    return len(row) == len(HEADER) and row[0].isdigit()


def rewrite(path: Path, rows: list[list[str]]) -> None:
    # the run directory's stale-file clean-up knows this temporary's name
    with atomic_file(path, "w", fsync=True, temporary=path.with_name(path.name + ".tmp")) as handle:
        csv.writer(handle).writerows([HEADER, *rows])


def set_aside(path: Path) -> Path:
    number = 1
    while (aside := path.with_name(f"{path.name}.damaged-{number}")).exists():
        number += 1
    os.replace(path, aside)
    return aside
