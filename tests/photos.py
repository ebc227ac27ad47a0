"""A mixed-aspect photo folder for bucket, caption and end-to-end tests."""

from __future__ import annotations

from pathlib import Path


# 5 portrait, 4 landscape, 3 square: the portrait bucket is the most common
PHOTO_SIZES = [(48, 32), (32, 48), (40, 40), (45, 30), (30, 45), (36, 36), (48, 32), (32, 48), (44, 44), (50, 34), (34, 50), (33, 52)]


def write_photo_folder(root: Path, sizes: list[tuple[int, int]] = PHOTO_SIZES) -> Path:
    """scikit-image's photos resized to mixed portrait/landscape/square sizes, with tag captions."""
    from PIL import Image
    from skimage import data

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}
    root.mkdir(parents=True, exist_ok=True)
    names = list(photos)
    for number, (width, height) in enumerate(sizes):
        name = names[number % len(names)]
        shape = "portrait" if height > width else "landscape" if width > height else "square"
        Image.fromarray(photos[name]).resize((width, height), Image.Resampling.BICUBIC).save(root / f"{number:02d}_{name}.png")
        (root / f"{number:02d}_{name}.txt").write_text(f"photo of {name}, {shape}, sharp, daylight")
    return root


# pixels: 32x32 area, sides in [16, 64] on an 8-pixel grid -> 24x40, 32x32, 40x24 (and the 2:1 pair)
BUCKET_OVERRIDES = ["data.resolution=32", "data.bucket_step=8", "data.min_side=16", "data.max_side=64"]
