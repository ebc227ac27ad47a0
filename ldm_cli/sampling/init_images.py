"""img2img init images: find them, plan each one's resize and centre crop, and read its pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from ldm_cli.bundle import file_sha256
from ldm_cli.data.images import IMAGE_EXTENSIONS, load_image_rgb, pil_to_tensor
from ldm_cli.diffusion.load import LatentDiffusion
from ldm_cli.errors import DataError
from ldm_cli.sampling.pipeline import check_image_size


@dataclass
class InitImage:
    """An img2img init image: where it is, its hash, and how it is resized and cropped."""

    path: Path
    sha256: str
    original_size: tuple[int, int]  # (width, height) as stored
    resized_to: Optional[tuple[int, int]]  # (width, height) before the centre crop; None: not resized
    size: tuple[int, int]  # (width, height) sampled at: multiples of the downsampling factor

    def note(self) -> Optional[str]:
        if self.size == self.original_size:
            return None
        steps = []
        if self.resized_to is not None:
            steps.append(f"resized to {self.resized_to[0]}x{self.resized_to[1]}")
        if self.size != (self.resized_to or self.original_size):
            steps.append(f"centre-cropped to {self.size[0]}x{self.size[1]}")
        width, height = self.original_size
        return f"note: init image {self.path.name} is {width}x{height}; {' and '.join(steps)}"

    def pixels(self) -> torch.Tensor:
        """[3, H, W] in [-1, 1], resized and cropped as planned."""
        image = load_image_rgb(self.path)
        if image.size != self.original_size:
            raise DataError(f"init image {self.path} changed while sampling")
        if self.resized_to is not None:
            image = image.resize(self.resized_to, Image.Resampling.BICUBIC)
        width, height = self.size
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return pil_to_tensor(image.crop((left, top, left + width, top + height)))


def plan_init_size(
    size: tuple[int, int], factor: int, resolution: int, height: Optional[int] = None, width: Optional[int] = None
) -> tuple[Optional[tuple[int, int]], tuple[int, int]]:
    """(size to resize to or None, final size) for an init image of `size` = (width, height).

    --height and --width: resize to cover them, centre-crop. One of them: scale to it, keep the aspect.
    Neither: keep the image's size unless a side exceeds 2× the model resolution (then the shorter side
    becomes the resolution, the longer at most twice it). Sides are then cropped down to multiples of
    the autoencoder's downsampling factor.
    """
    original_width, original_height = size
    if height is not None and width is not None:
        scale = max(width / original_width, height / original_height)
    elif height is not None:
        scale = height / original_height
    elif width is not None:
        scale = width / original_width
    elif max(size) > 2 * resolution:
        scale = min(resolution / min(size), 2 * resolution / max(size))
    else:
        scale = 1.0
    resized = (max(1, round(original_width * scale)), max(1, round(original_height * scale)))
    if width is not None:
        resized = (max(resized[0], width), resized[1])
    if height is not None:
        resized = (resized[0], max(resized[1], height))
    final = (width or resized[0] // factor * factor, height or resized[1] // factor * factor)
    return (None if resized == size else resized), final


def list_init_images(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"--init folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return images
    if not path.exists():
        raise DataError(f"init image not found: {path}")
    return [path]


def inspect_init_image(
    path: Path, model: LatentDiffusion, height: Optional[int], width: Optional[int],
    resized_to: Optional[tuple[int, int]] = None, replay: bool = False,
) -> InitImage:
    """Read (DataError if unreadable) and plan one init image; `replay` reuses a recorded plan."""
    original_size = load_image_rgb(path).size
    if replay:
        size = (width, height)
    else:
        resized_to, size = plan_init_size(original_size, model.downsampling_factor, model.resolution, height, width)
    check_image_size(size[1], size[0], model, what=f"init image {Path(path).name} (as {size[0]}x{size[1]})")
    return InitImage(Path(path).resolve(), file_sha256(Path(path)), original_size, resized_to, size)  # type: ignore[arg-type]
