"""Image grids for progress images, contact sheets and labelled sample grids."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] → uint8 [B,H,W,3]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid(images: torch.Tensor, columns: int, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile [B,3,H,W] images in [-1,1] into one PIL image, `columns` wide."""
    pixels = to_uint8(images).numpy()
    count, height, width = pixels.shape[:3]
    rows = (count + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), (255, 255, 255))
    for i in range(count):
        row, col = divmod(i, columns)
        sheet.paste(Image.fromarray(pixels[i]), (padding + col * (width + padding), padding + row * (height + padding)))
    if scale != 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    return sheet


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int, scale: int = 1) -> Image.Image:
    """A grid with one text label per row (e.g. the prompt), written to the left of the row."""
    grid = make_grid(images, columns, scale=scale)
    rows = (images.shape[0] + columns - 1) // columns
    label_width = 8 + 6 * max((len(label) for label in labels), default=0)
    sheet = Image.new("RGB", (grid.width + label_width, grid.height), (255, 255, 255))
    sheet.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(sheet)
    row_height = grid.height / max(rows, 1)
    for row, label in enumerate(labels[:rows]):
        draw.text((4, int(row * row_height + row_height / 2 - 5)), label, fill=(0, 0, 0))
    return sheet


def save_image(image: Image.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
