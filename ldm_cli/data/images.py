"""Captioned image folders: discovery, captions, robust RGB loading, crops.

Design notes
- Discovery is eager (file names and captions only); pixels are read lazily per item.
- A file that fails to load (unreadable, truncated, zero bytes, not an image) is never
  fatal: `__getitem__` warns once per file, records it in `dataset.bad_files` and returns
  the next good item in order (wrapping around), so a long run never crashes and the
  substitute is deterministic. The item's `index` says which file was actually returned.
  `bad_files` is per process (DataLoader workers keep their own); `ldm data check`
  (check.py) gives the full count up front.
- Random crop/flip come from a generator seeded by (seed, epoch, index), never from a
  global RNG, so an item looks the same after an exact resume. Call `set_epoch(e)`.
- The held-out split ranks files by a hash of their relative path: it does not depend on
  the training seed and hardly moves when files are added.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm
from PIL import Image, ImageFile, ImageOps

from ldm_cli.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CROPS = ("center", "random")
SPLITS = ("train", "holdout", "all")


@dataclass
class DataConfig:
    path: Optional[str] = None  # image folder (recursive); captions from .txt sidecars or metadata.jsonl/csv
    resolution: int = 256  # images are resized (shorter side) and cropped to resolution x resolution
    crop: str = "center"  # "center" | "random"
    random_flip: bool = False  # horizontal flip; leave off when captions say left/right
    holdout_fraction: float = 0.05  # deterministic held-out split for evaluation (>= 1 image when > 1)
    num_workers: int = 0  # DataLoader worker processes
    source: str = "folder"  # "folder": read `path` | "shapes": generate the built-in shapes set
    num_images: int = 2000  # size of a generated set (source=shapes)
    caption_extension: str = ".txt"  # sidecar captions: photo.jpg -> photo<caption_extension>
    # aspect-ratio buckets (`ldm encode --buckets`, data/buckets.py): area resolution², sides multiples of bucket_step
    buckets: bool = False
    bucket_step: int = 64  # pixels; a multiple of the autoencoder's downsampling factor
    min_side: Optional[int] = None  # null: resolution / 2
    max_side: Optional[int] = None  # null: resolution * 2
    max_aspect: float = 2.0

    def validate(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"data.crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.resolution < 1:
            raise ConfigError(f"data.resolution must be positive, got {self.resolution}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.source not in ("folder", "shapes"):
            raise ConfigError(f"data.source must be 'folder' or 'shapes', got {self.source!r}")
        if self.source == "shapes" and self.num_images < 1:
            raise ConfigError(f"data.num_images must be positive, got {self.num_images}")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(f"data.caption_extension must look like .txt, got {self.caption_extension!r}")
        if self.bucket_step < 1 or self.max_aspect < 1:
            raise ConfigError(f"data.bucket_step must be positive and data.max_aspect >= 1, got {self.bucket_step} and {self.max_aspect}")


# ----------------------------------------------------------------------------- pixels

def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "P":
        # palette transparency (a transparent index or per-entry alpha) becomes alpha first
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            values = values / 257.0  # 0..65535 -> 0..255
        elif mode == "I":
            # 32-bit ints usually hold 16-bit samples (some PNG/TIFF decoders use "I")
            values = values / 257.0 if values.max(initial=0) > 255 else values
        else:
            # floats: [0,1] data is scaled, anything else is taken as 0..255
            values = values * 255.0 if values.max(initial=0) <= 1.0 else values
        gray = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # premultiplied modes are un-premultiplied here
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, LAB, HSV
    except ValueError as error:
        raise DataError(f"cannot convert image mode {mode} to RGB ({error})") from error


def image_size(path: Union[str, Path]) -> Optional[tuple[int, int]]:
    """(width, height) as `load_image_rgb` returns it (EXIF rotation applied), from the header; None if unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # 5-8: stored rotated by 90 degrees
    except Exception:  # the encoder reports bad files when it reads them
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image_rgb(path: Union[str, Path], min_size: Optional[int] = None) -> Image.Image:
    """Read any supported image as 8-bit RGB, upright per EXIF, fully decoded.

    `min_size`: the caller only needs a shorter side this long, so large JPEGs may be
    decoded at 1/2, 1/4 or 1/8 scale (DCT scaling: several times faster, never below it).
    Raises DataError (naming the file) for missing, empty, truncated or non-image files.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"cannot read image {path}: the file is empty")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # some library flipped PIL's global switch; truncated files would load half grey
        raise DataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; unset it to detect truncated images")
    try:
        with Image.open(path) as image:
            if min_size is not None and image.format == "JPEG":
                image.draft(None, (min_size, min_size))
            image.load()  # full decode: truncated data raises here, not later
            try:
                ImageOps.exif_transpose(image, in_place=True)
            except Exception:  # a broken EXIF block costs the orientation, not the image
                pass
            return _to_rgb(image)
    except DataError as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    except Exception as error:  # decoders raise OSError, SyntaxError, struct.error, ...; all mean "bad file"
        reason = str(error) or type(error).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 [3,H,W] in [-1, 1]."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """[3,H,W] (or [1,3,H,W]) in [-1, 1] -> 8-bit RGB PIL image; values outside are clipped."""
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected a [3,H,W] image tensor, got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    pixels = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")


def resize_and_crop(image: Image.Image, resolution: int, crop: str, flip: bool,
                    rng: Optional[np.random.Generator]) -> Image.Image:
    """Shorter side -> resolution (bicubic, antialiased), then a square crop, then maybe a flip.

    `rng` picks the random crop offset; unused for center crops.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        # PIL widens the bicubic kernel when shrinking, so downscales are antialiased
        image = image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)
    spare_x, spare_y = new_size[0] - resolution, new_size[1] - resolution
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
    else:
        left, top = spare_x // 2, spare_y // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


# ----------------------------------------------------------------------------- discovery

def _is_hidden(name: str) -> bool:
    return name.startswith(".")  # .ipynb_checkpoints, macOS "._x.jpg" resource forks, ...


def find_images(root: Path) -> list[Path]:
    """Every image under `root` (recursive, hidden entries skipped), sorted by relative path.

    Raises DataError when `root` is not a folder or holds no images.
    """
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not _is_hidden(name)]
        for name in files:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(folder) / name)
    if not found:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"no images found in {root} (looked for {kinds}, in subfolders too)")
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _metadata_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a metadata.jsonl / metadata.csv file."""
    try:
        return _read_metadata_rows(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); save it as UTF-8") from None
    except csv.Error as error:
        raise DataError(f"{path} is not a readable CSV file ({error})") from None


def _read_metadata_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object with file_name and text")
                rows.append((f"{path}:{number}", row))
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                rows.append((f"{path}:{number}", row))
    return rows


def read_captions(root: Path) -> dict[Path, str]:
    """Captions from every metadata.jsonl / metadata.csv under `root`, by image path.

    Metadata `file_name` is relative to the metadata file's folder (Hugging Face
    imagefolder); an entry whose path leaves `root` ("../x.png", "/abs/x.png") raises
    DataError. Paths are normalised, not resolved, so symlinked images inside the folder
    are fine. Keys are absolute normalised paths (see `_key`).
    """
    root = _key(root)
    captions: dict[Path, str] = {}
    metadata_files = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not _is_hidden(name)]
        metadata_files += [Path(folder) / name for name in files if name in METADATA_FILES]
    for metadata in sorted(metadata_files, key=lambda path: path.relative_to(root).as_posix()):
        for where, row in _metadata_rows(metadata):
            file_name = row.get("file_name")
            if not file_name:
                raise DataError(f"{where}: entry has no file_name (expected columns file_name and text)")
            image_path = _key(metadata.parent / str(file_name))
            if not image_path.is_relative_to(root):
                raise DataError(f"{where}: file_name {file_name!r} points outside the dataset folder {root}")
            text = row.get("text")
            if text is not None:
                captions[image_path] = str(text).strip()
    return captions


def _key(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _sidecar_caption(image_path: Path, extension: str = ".txt") -> Optional[str]:
    sidecar = image_path.with_suffix(extension)
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return None


def captions_for(root: Path, image_paths: list[Path], extension: str = ".txt") -> list[str]:
    """The caption of each image: its sidecar (name.txt, or `extension`), else metadata, else ""."""
    metadata = read_captions(root)
    captions = []
    for path in image_paths:
        sidecar = _sidecar_caption(path, extension)
        captions.append(sidecar if sidecar is not None else metadata.get(_key(path), ""))
    return captions


def holdout_count(n_images: int, holdout_fraction: float) -> int:
    """Images held out: round(fraction * n), at least 1 when n > 1, never all of them."""
    if n_images < 2 or holdout_fraction <= 0:
        return 0
    return min(n_images - 1, max(1, round(holdout_fraction * n_images)))


def _split_rank(relative_path: str) -> str:
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- dataset

class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of captioned images, as dict(image=[3,R,R] in [-1,1], caption, index, path)."""

    def __init__(self, root: Union[str, Path], resolution: int = 256, crop: str = "center",
                 random_flip: bool = False, split: str = "train", holdout_fraction: float = 0.05,
                 seed: int = 0, caption_extension: str = ".txt") -> None:
        if crop not in CROPS:
            raise ConfigError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if resolution < 1:
            raise ConfigError(f"resolution must be positive, got {resolution}")
        self.root = Path(root)
        self.resolution, self.crop, self.random_flip = resolution, crop, random_flip
        self.split, self.seed, self.epoch = split, seed, 0

        every_image = find_images(self.root)
        relative = [path.relative_to(self.root).as_posix() for path in every_image]
        n_holdout = holdout_count(len(every_image), holdout_fraction)
        held_out = set(sorted(relative, key=_split_rank)[:n_holdout])
        self.paths: list[Path] = [
            path for path, rel in zip(every_image, relative)
            if split == "all" or (rel in held_out) == (split == "holdout")
        ]

        self.captions: list[str] = captions_for(self.root, self.paths, caption_extension)
        self.bad_files: list[str] = []

    @classmethod
    def from_config(cls, config: DataConfig, root: Union[str, Path, None] = None, split: str = "train",
                    seed: int = 0) -> "ImageFolderDataset":
        config.validate()
        root = root if root is not None else config.path
        if root is None:
            raise ConfigError("data.path is not set: pass data.path=DIR (a folder of images)")
        return cls(root, config.resolution, config.crop, config.random_flip, split,
                   config.holdout_fraction, seed, config.caption_extension)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the crop/flip draws of `epoch` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def item_rng(self, index: int) -> np.random.Generator:
        """The generator of item `index` in the current epoch: independent of any global RNG."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def load(self, index: int, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """Image `index` as [3,R,R] in [-1,1]; raises DataError if the file is bad."""
        rng = rng if rng is not None else self.item_rng(index)
        flip = self.random_flip and bool(rng.random() < 0.5)
        image = load_image_rgb(self.paths[index], min_size=self.resolution)
        image = resize_and_crop(image, self.resolution, self.crop, flip, rng)
        return pil_to_tensor(image)

    def _mark_bad(self, index: int, error: DataError) -> None:
        path = str(self.paths[index])
        if path not in self.bad_files:
            self.bad_files.append(path)
            # one ldm line per file (per process), above any progress bar; `ldm data check` lists them all
            tqdm.write(f"warning: skipping unreadable image: {error}", file=sys.stderr)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        rng = self.item_rng(index)  # drawn for the requested index, also when substituting
        bad = set(self.bad_files)
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            if str(self.paths[candidate]) in bad:
                continue
            try:
                image = self.load(candidate, rng)
            except DataError as error:
                self._mark_bad(candidate, error)
                rng = self.item_rng(index)  # same draws whichever file ends up used
                continue
            return {"image": image, "caption": self.captions[candidate], "index": candidate,
                    "path": str(self.paths[candidate])}
        raise DataError(f"none of the {len(self.paths)} images in {self.root} could be read")


def resolve_data_root(config: DataConfig, cache_dir: Union[str, Path]) -> Path:
    """The folder to read: `config.path`, or for source=shapes the generated set (made once)."""
    config.validate()
    if config.source == "folder":
        if config.path is None:
            raise ConfigError("data.path is not set: pass data.path=DIR (a folder of images)")
        return Path(config.path)
    from ldm_cli.data.shapes import write_shapes_dataset  # only needed for the built-in set

    root = Path(config.path) if config.path is not None else (
        Path(cache_dir) / f"shapes-{config.num_images}x{config.resolution}")
    if not (root / "metadata.jsonl").is_file():  # written last: present means complete
        write_shapes_dataset(root, config.num_images, config.resolution, seed=0)
    return root
