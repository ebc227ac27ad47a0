"""The built-in captioned dataset: one coloured shape on a plain background.

Every image is described exactly by five attributes, so a caption says everything there
is to see ("a small red circle in the top left on a white background"). That makes the
set useful twice: it trains a text-conditioned model in minutes at 32x32, and the
deterministic `classify_shape_image` can later score a generated image against its prompt.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

SHAPES: list[str] = ["circle", "square", "triangle", "diamond", "cross"]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 130, 20),
    "yellow": (245, 225, 50),
    "green": (30, 160, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SIZES: dict[str, float] = {"small": 0.26, "large": 0.42}  # side of the shape's box / image side
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) of the box centre / image side
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
ATTRIBUTES = ("size", "colour", "shape", "position", "background")

# A shape colour is only drawn on backgrounds it stands out from (RGB distance), so the
# classifier can always separate shape from background and captions are never ambiguous.
MIN_CONTRAST = 120.0
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: clean anti-aliased edges at 32 px
_JITTER = 0.02  # random offset of the centre / image side; keeps large shapes inside
_SIZE_JITTER = 0.06  # relative size variation

Attributes = dict[str, str]


def _rgb_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def colours_for_background(background: str) -> list[str]:
    """Shape colours that contrast with `background` (in COLOURS order)."""
    bg = BACKGROUNDS[background]
    return [name for name, rgb in COLOURS.items() if _rgb_distance(rgb, bg) >= MIN_CONTRAST]


def caption_for(attrs: Attributes) -> str:
    """'a small red circle in the top left on a white background'."""
    return (
        f"a {attrs['size']} {attrs['colour']} {attrs['shape']} in the {attrs['position']} "
        f"on a {attrs['background']} background"
    )


_CAPTION_RE = re.compile(
    r"^a (?P<size>{}) (?P<colour>{}) (?P<shape>{}) in the (?P<position>{}) on a (?P<background>{}) background$".format(
        "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES), "|".join(POSITIONS), "|".join(BACKGROUNDS)
    )
)


def parse_caption(caption: str) -> Attributes:
    """Inverse of `caption_for`; raises ValueError for text outside the grammar."""
    match = _CAPTION_RE.match(" ".join(caption.strip().lower().split()))
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return match.groupdict()


def _shape_polygon(shape: str, left: float, top: float, side: float) -> list[tuple[float, float]]:
    """Outline of a polygonal shape filling the square box (left, top, side)."""
    right, bottom = left + side, top + side
    mid_x, mid_y = left + side / 2, top + side / 2
    if shape == "square":
        return [(left, top), (right, top), (right, bottom), (left, bottom)]
    if shape == "triangle":  # apex up, base on the box bottom
        return [(mid_x, top), (right, bottom), (left, bottom)]
    if shape == "diamond":
        return [(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)]
    if shape == "cross":  # plus sign, arms a third of the box wide
        a, b = left + side / 3, left + 2 * side / 3
        c, d = top + side / 3, top + 2 * side / 3
        return [(a, top), (b, top), (b, c), (right, c), (right, d), (b, d),
                (b, bottom), (a, bottom), (a, d), (left, d), (left, c), (a, c)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(shape: str, size: int, center: tuple[float, float], side: float) -> np.ndarray:
    """Fraction of each pixel the shape covers, [size,size] float32 in [0,1].

    `center` and `side` are fractions of the image side. Drawn at 4x and box-filtered
    down, which is exact area coverage up to the 4x grid: clean edges even at 32 px.
    """
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    side_px = side * big
    left, top = center[0] * big - side_px / 2, center[1] * big - side_px / 2
    side_px -= 1  # PIL fills both edge pixels: a box from x to x + n covers n + 1 of them
    if shape == "circle":
        draw.ellipse([left, top, left + side_px, top + side_px], fill=255)
    else:
        draw.polygon(_shape_polygon(shape, left, top, side_px), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_shape(attrs: Attributes, size: int, center: tuple[float, float] | None = None,
                 scale: float = 1.0) -> Image.Image:
    """Draw exactly the image `attrs` describes, optionally with the box centre and size nudged."""
    center = center if center is not None else POSITIONS[attrs["position"]]
    coverage = shape_coverage(attrs["shape"], size, center, SIZES[attrs["size"]] * scale)[..., None]
    background = np.array(BACKGROUNDS[attrs["background"]], dtype=np.float32)
    colour = np.array(COLOURS[attrs["colour"]], dtype=np.float32)
    pixels = background + coverage * (colour - background)
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def sample_attributes(rng: np.random.Generator) -> Attributes:
    background = str(rng.choice(list(BACKGROUNDS)))
    return {
        "size": str(rng.choice(list(SIZES))),
        "colour": str(rng.choice(colours_for_background(background))),
        "shape": str(rng.choice(SHAPES)),
        "position": str(rng.choice(list(POSITIONS))),
        "background": background,
    }


def draw_shape_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, str, Attributes]:
    """One random captioned image: (RGB image, caption, attributes)."""
    attrs = sample_attributes(rng)
    cx, cy = POSITIONS[attrs["position"]]
    dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
    scale = 1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
    image = render_shape(attrs, size, center=(cx + dx, cy + dy), scale=scale)
    return image, caption_for(attrs), attrs


def write_shapes_dataset(out_dir: Union[str, Path], n: int, size: int, seed: int = 0) -> Path:
    """Write `00000.png` ... and `metadata.jsonl` (file_name, text); returns the folder.

    Image i depends only on (seed, i), so a larger set starts with the smaller one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    lines = []
    for index in range(n):
        image, caption, _ = draw_shape_image(np.random.default_rng([seed, index]), size)
        name = f"{index:0{width}d}.png"
        image.save(out / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    # metadata last: a folder with metadata.jsonl is a complete dataset
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "metadata.jsonl")
    return out


# ----------------------------------------------------------------------------- classifier

# area of each shape / area of its box, and where its area centroid sits below the box centre
# (as a fraction of the side): with these, image moments give every candidate's box.
_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0, "cross": 0.0}
# Gaussian blurs (in pixels) each candidate is also rendered with: a decoder's soft edges fill a small
# cross's inner corners, which a crisp template would read as a diamond
_SOFTENING = (0.0, 0.5, 0.75, 1.0)


@functools.lru_cache(maxsize=None)
def _gaussian_rows(size: int, sigma: float) -> np.ndarray:
    """[size, size]: row i holds the Gaussian weights of `sigma` pixels around pixel i, summing to 1 (so
    renormalised at the image's border)."""
    positions = np.arange(size, dtype=np.float32)
    kernel = np.exp(-0.5 * ((positions[:, None] - positions[None, :]) / sigma) ** 2)
    return kernel / kernel.sum(axis=1, keepdims=True)


def _soften(coverage: np.ndarray, sigma: float) -> np.ndarray:
    """`coverage` blurred by a Gaussian of `sigma` pixels."""
    if sigma == 0:
        return coverage
    kernel = _gaussian_rows(coverage.shape[0], sigma)
    return kernel @ coverage @ kernel.T


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: _rgb_distance(tuple(value), palette[name]))


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))


def _shape_region(mask: np.ndarray) -> np.ndarray:
    """Drop isolated noise pixels (fewer than 3 set neighbours), then grow by one pixel for soft edges."""
    kept = mask & (_neighbour_count(mask) >= 4)
    return _neighbour_count(kept) > 0


def classify_shape_image(image: Union[Image.Image, np.ndarray]) -> dict[str, str | None]:
    """Estimate the five attributes of a (generated) shapes image, without learning.

    background: median border colour -> nearest background. colour: median of the pixels
    far from it -> nearest colour. Coverage: each pixel's position between background and
    that colour. shape: for each kind, its box follows from the coverage moments (centre,
    area / fill ratio); render it, crisp and softened, and keep the kind that best reproduces the coverage.
    position and size: that box's centre and side -> nearest anchor / size.
    Attributes that cannot be seen (no shape pixels) come back as None.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)[..., :3].astype(np.float32)
    height, width = rgb.shape[:2]
    if height != width:
        raise ValueError(f"shapes images are square, got {width}x{height}")
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    attrs: dict[str, str | None] = {name: None for name in ATTRIBUTES}
    attrs["background"] = _nearest(np.median(border, axis=0), BACKGROUNDS)
    background = np.array(BACKGROUNDS[attrs["background"]], dtype=np.float32)

    distance = np.linalg.norm(rgb - background, axis=-1)
    far = distance > MIN_CONTRAST / 2
    if _neighbour_count(far)[far].max(initial=0) < 4:
        return attrs  # nothing but (at most) scattered noise
    interior = far & (_neighbour_count(far) == 9)  # away from anti-aliased edges
    solid = interior if interior.any() else far & (_neighbour_count(far) >= 4)
    attrs["colour"] = _nearest(np.median(rgb[solid], axis=0), COLOURS)

    # alpha in a mix  background + alpha * (colour - background), projected per pixel
    direction = np.array(COLOURS[attrs["colour"]], dtype=np.float32) - background
    alpha = np.clip((rgb - background) @ direction / float(direction @ direction), 0.0, 1.0)
    region = _shape_region(far)
    coverage = alpha * region
    area = float(coverage.sum()) / (width * width)  # as a fraction of the image
    ys, xs = (np.indices(coverage.shape) + 0.5) / width
    center_x = float((coverage * xs).sum() / coverage.sum())
    center_y = float((coverage * ys).sum() / coverage.sum())

    best = None
    for shape in SHAPES:
        side = float(np.sqrt(area / _FILL[shape]))
        box_center = (center_x, center_y - _CENTROID_DROP[shape] * side)
        template = shape_coverage(shape, width, box_center, side)
        # the best of its renderings, cut to the region seen as the shape (as `coverage` is)
        error = min(float(np.abs(_soften(template, sigma) * region - coverage).sum()) for sigma in _SOFTENING)
        if best is None or error < best[0]:
            best = (error, shape, box_center, side)
    _, attrs["shape"], box_center, side = best
    attrs["position"] = min(POSITIONS, key=lambda name: float(np.hypot(*np.subtract(box_center, POSITIONS[name]))))
    attrs["size"] = min(SIZES, key=lambda name: abs(side - SIZES[name]))
    return attrs


def attribute_matches(image: Union[Image.Image, np.ndarray], caption: str) -> dict[str, bool]:
    """Per attribute, whether the image shows what the caption asks for."""
    wanted = parse_caption(caption)
    seen = classify_shape_image(image)
    return {name: seen[name] == wanted[name] for name in ATTRIBUTES}
