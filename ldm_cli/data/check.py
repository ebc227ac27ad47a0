"""`ldm data check`: what a folder holds and which files a training run would skip.

Every image is fully decoded (a header read does not catch truncated files); JPEGs are
decoded at reduced scale (PIL draft mode), which still reads the whole entropy stream.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageFile

from ldm_cli.data.buckets import BucketSpec, assign_buckets, enumerate_buckets, format_histogram, histogram
from ldm_cli.data.images import captions_for, find_images, holdout_count
from ldm_cli.errors import DataError


@dataclass
class DataReport:
    root: str
    n_images: int  # files with an image extension, good or bad
    n_bad: int
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    n_captioned: int = 0
    caption_coverage: float = 0.0  # percent of images with a non-empty caption
    width: tuple[int, int, int] = (0, 0, 0)  # min, median, max over good images
    height: tuple[int, int, int] = (0, 0, 0)
    formats: dict[str, int] = field(default_factory=dict)  # PIL format name -> count
    modes: dict[str, int] = field(default_factory=dict)  # PIL mode -> count
    n_smaller: int = 0  # good images whose shorter side is below `resolution` (upscaled)
    resolution: Optional[int] = None
    n_holdout: int = 0
    buckets: Optional[list[tuple[tuple[int, int], int]]] = None  # ((width, height), images), most common first

    @property
    def n_good(self) -> int:
        return self.n_images - self.n_bad


@dataclass
class _FileInfo:
    path: str
    format: Optional[str] = None
    mode: Optional[str] = None
    size: Optional[tuple[int, int]] = None
    error: Optional[str] = None


def _inspect(path: Path) -> _FileInfo:
    info = _FileInfo(str(path))
    try:
        if path.stat().st_size == 0:
            info.error = "empty file"
            return info
        with Image.open(path) as image:
            info.format, info.mode, info.size = image.format, image.mode, image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # shown rotated by 90 degrees
                info.size = image.size[::-1]
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
    except Exception as error:  # any failure is exactly what this report is for
        info.error = str(error) or type(error).__name__
    return info


def check_dataset(root: Union[str, Path], resolution: Optional[int] = None,
                  holdout_fraction: float = 0.05, workers: Optional[int] = None,
                  buckets: Optional[BucketSpec] = None, caption_extension: str = ".txt") -> DataReport:
    """Decode every image under `root` and summarise; raises DataError for a missing/empty folder.
    With `buckets`, also count the images each aspect-ratio bucket would get."""
    root = Path(root)
    paths = find_images(root)
    captions = captions_for(root, paths, caption_extension)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; unset it to detect truncated images")
    # decoding releases the GIL, so threads use all cores
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        infos = list(pool.map(_inspect, paths))

    good = [info for info in infos if info.error is None]
    n_captioned = sum(1 for caption in captions if caption)
    widths = np.array([info.size[0] for info in good]) if good else np.zeros(1, dtype=int)
    heights = np.array([info.size[1] for info in good]) if good else np.zeros(1, dtype=int)

    def spread(values: np.ndarray) -> tuple[int, int, int]:
        return int(values.min()), int(np.median(values)), int(values.max())

    return DataReport(
        root=str(root),
        n_images=len(infos),
        n_bad=len(infos) - len(good),
        bad_files=[(info.path, info.error) for info in infos if info.error is not None],
        n_captioned=n_captioned,
        caption_coverage=100.0 * n_captioned / len(infos),
        width=spread(widths),
        height=spread(heights),
        formats=dict(Counter(info.format for info in good).most_common()),
        modes=dict(Counter(info.mode for info in good).most_common()),
        n_smaller=sum(1 for info in good if resolution and min(info.size) < resolution),
        resolution=resolution,
        n_holdout=holdout_count(len(infos), holdout_fraction),
        buckets=histogram(assign_buckets([info.size for info in good], enumerate_buckets(buckets))) if buckets else None,
    )


def format_report(report: DataReport, max_bad: int = 20) -> str:
    """Human-readable summary, one fact per line."""
    lines = [
        f"dataset: {report.root}",
        f"images: {report.n_images} ({report.n_good} readable, {report.n_bad} bad)",
        f"captions: {report.n_captioned}/{report.n_images} ({report.caption_coverage:.1f}%)",
        "width: min {} / median {} / max {}".format(*report.width),
        "height: min {} / median {} / max {}".format(*report.height),
        "formats: " + (", ".join(f"{name} {count}" for name, count in report.formats.items()) or "-"),
        "modes: " + (", ".join(f"{name} {count}" for name, count in report.modes.items()) or "-"),
        f"held out for evaluation: {report.n_holdout}",
    ]
    if report.resolution:
        lines.append(f"smaller than {report.resolution}px (will be upscaled): {report.n_smaller}")
    if report.buckets is not None:
        lines.append(format_histogram(report.buckets))
    if report.bad_files:
        lines.append(f"bad files (skipped during training): {report.n_bad}")
        for path, reason in report.bad_files[:max_bad]:
            lines.append(f"  {path}: {reason}")
        if report.n_bad > max_bad:
            lines.append(f"  ... and {report.n_bad - max_bad} more")
    return "\n".join(lines)
