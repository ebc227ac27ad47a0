"""Where sampled images go: `{index:05d}-{seed}.png` names claimed in --out, written all or nothing.

The index continues after the highest one already in the folder, and a name is claimed with O_EXCL:
nothing is ever overwritten, even by two runs at once.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from PIL import Image

from ldm_cli.atomic import atomic_file
from ldm_cli.errors import LdmError
from ldm_cli.grid import make_grid
from ldm_cli.sampling.metadata import png_info

INDEXED_NAME = re.compile(r"^(\d{5,})-.*\.(png|json)$")


@dataclass
class Written:
    images: list[Path]
    grid: Optional[Path] = None

    def summary(self) -> str:
        if not self.images:
            return "no images written"
        names = self.images[0].name if len(self.images) == 1 else f"{self.images[0].name} … {self.images[-1].name}"
        text = f"wrote {len(self.images)} image(s) to {self.images[0].parent}: {names}"
        return text + (f"\ngrid: {self.grid}" if self.grid else "")


class OutputFolder:
    """Claims `{index:05d}-{seed}.png` names after the highest index already in the folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.index: Optional[int] = None

    def _next_index(self) -> int:
        highest = -1
        if self.path.is_dir():
            for entry in self.path.iterdir():
                match = INDEXED_NAME.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest + 1

    def _claim_grid(self, stem: str) -> Path:
        """`stem.png`, or `stem-1.png`, ... when taken: a grid never replaces an existing file."""
        for number in itertools.count():
            path = self.path / (f"{stem}.png" if number == 0 else f"{stem}-{number}.png")
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:
                continue
        raise AssertionError("unreachable")

    def _claim(self, name_of_index: Callable[[int], str]) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.index is None:
            self.index = self._next_index()
        while True:
            path = self.path / name_of_index(self.index)
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:  # another run took it meanwhile
                self.index += 1

    def write_image(self, image: Image.Image, seed: int, meta: dict[str, Any], json_sidecar: bool) -> Path:
        path = self._claim(lambda index: f"{index:05d}-{seed}.png")
        self.index += 1  # type: ignore[operator]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(meta))
        write_claimed(path, buffer.getvalue())
        if json_sidecar:
            write_claimed(path.with_suffix(".json"), (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return path

    def write_grid(self, images: list[torch.Tensor], columns: int, first: Path, last: Path) -> Path:
        """A contact sheet of [3, H, W] images in [-1, 1]; smaller ones are padded with white."""
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        padded = torch.ones(len(images), 3, height, width)
        for i, image in enumerate(images):
            padded[i, :, : image.shape[-2], : image.shape[-1]] = image
        path = self._claim_grid(f"grid-{first.name.split('-')[0]}-{last.name.split('-')[0]}")
        buffer = io.BytesIO()
        make_grid(padded, columns).save(buffer, format="PNG")
        write_claimed(path, buffer.getvalue())
        return path


def write_claimed(path: Path, data: bytes) -> None:
    """Write a claimed name all or nothing: a full disk leaves no half-written or 0-byte image."""
    try:
        with atomic_file(path, fsync=True) as handle:
            handle.write(data)
    except OSError as error:
        path.unlink(missing_ok=True)  # the name claimed for it
        raise LdmError(f"could not write {path} ({error.strerror or error}); nothing was left in its place") from error


def grid_columns(count: int, per_row: int) -> int:
    """A grid's columns: one row per prompt when it holds several images, else a near-square."""
    return per_row if 1 < per_row < count else max(1, math.ceil(math.sqrt(count)))
