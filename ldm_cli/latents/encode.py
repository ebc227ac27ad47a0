"""`ldm encode`: an image folder → a sharded latent dataset (see `dataset.py` for the layout).

Every image is encoded once; we keep the posterior's mean and log-variance so training can draw
a fresh latent each epoch. Shard k holds the folder's items [k * shard_size, (k + 1) * shard_size)
in sorted-path order, so the split is the same on every run and on every process.

Crash safety: a shard is written into `.tmp-shard_XXXXX-<random>` and renamed into place only when
complete, so a reader never sees half a shard; a re-run skips shards already in place, removes
stale temporary files, and refuses a directory made with another autoencoder or other settings.
`index.json` is rewritten (atomically) after every shard and marked `complete` at the end.

Under torchrun, process r encodes the shards k with k % world_size == r; the main process
writes the index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm_cli.autoencoder.load import LoadedAutoencoder, load_autoencoder
from ldm_cli.config import EncodeConfig, to_dict
from ldm_cli.data.images import DataConfig, ImageFolderDataset, resolve_data_root
from ldm_cli.diffusion.text import TextEncoder, load_text_encoder
from ldm_cli.errors import ConfigError, DataError, IncompatibleError, RunDirError
from ldm_cli.latents.dataset import FORMAT, INDEX_FILE, SHARD_META, UNCOND_FILE, shard_files, shard_name
from ldm_cli.training.distributed import DistInfo, barrier, device_for, distributed, on_main
from ldm_cli.training.precision import autocast, resolve_device, resolve_precision

TMP_PREFIX = ".tmp-"
MAX_LISTED_BAD_FILES = 100
# What a re-run must share with the latents already in the directory to add shards to them.
SETTINGS = ("latent_scale", "latent_shift", "resolution", "latent_shape", "flip", "shard_size", "text", "num_files", "files_digest")


# --- the work split: pure functions -----------------------------------------------------------------


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` encodes: every world_size-th, starting at rank."""
    return list(range(rank, num_shards, world_size))


def shard_items(number: int, shard_size: int, num_items: int) -> range:
    """The dataset items shard `number` covers."""
    return range(number * shard_size, min((number + 1) * shard_size, num_items))


def plan_batches(shards: list[int], shard_size: int, num_items: int, batch_size: int) -> list[list[int]]:
    """Batches of item indices, in order, none crossing a shard boundary."""
    batches = []
    for number in shards:
        items = shard_items(number, shard_size, num_items)
        batches += [list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
    return batches


# --- reading images (in DataLoader workers) --------------------------------------------------------


class _ImagesOrErrors(Dataset):
    """Item i of the folder as pixels, or the reason it cannot be read: bad files are skipped, not substituted."""

    def __init__(self, images: ImageFolderDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            return index, self.images.load(index), None
        except DataError as error:
            return index, None, str(error)


def _collate(items: list[tuple[int, Optional[torch.Tensor], Optional[str]]]) -> dict[str, Any]:
    good = [(index, image) for index, image, _ in items if image is not None]
    return {
        "indices": [index for index, _ in good],
        "images": torch.stack([image for _, image in good]) if good else None,
        "bad": [(index, error) for index, image, error in items if image is None],
        "first": items[0][0],
    }


# --- writing ---------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, value: Any) -> None:
    temporary = path.with_name(f"{TMP_PREFIX}{path.stem}-{secrets.token_hex(4)}{path.suffix}")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


def _write_npy_atomic(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f"{TMP_PREFIX}{path.stem}-{secrets.token_hex(4)}.npy")
    np.save(temporary, array)
    os.replace(temporary, path)


def write_shard(out: Path, number: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write one shard into a temporary directory, then rename it into place (all or nothing)."""
    final = out / shard_name(number)
    staging = out / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        (staging / "captions.json").write_text(json.dumps(meta["captions"]))
        (staging / "paths.json").write_text(json.dumps(meta["paths"]))
        (staging / SHARD_META).write_text(json.dumps({"count": len(meta["paths"]), "items": meta["items"], "bad_files": meta["bad_files"]}))
        if final.exists():  # an incomplete leftover (a file deleted by hand): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


class _ShardBuffer:
    """Encodings of one shard, gathered batch by batch until its last batch arrives."""

    def __init__(self, number: int, items: range, batches: int) -> None:
        self.number, self.items, self.batches_left = number, items, batches
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.captions: list[str] = []
        self.paths: list[str] = []
        self.bad_files: list[str] = []

    def add(self, arrays: dict[str, np.ndarray], captions: list[str], paths: list[str]) -> None:
        for name, array in arrays.items():
            self.arrays.setdefault(name, []).append(array)
        self.captions += captions
        self.paths += paths

    def finish(self, empty: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {name: np.concatenate(self.arrays[name]) if name in self.arrays else blank for name, blank in empty.items()}
        meta = {"captions": self.captions, "paths": self.paths, "bad_files": self.bad_files, "items": [self.items.start, self.items.stop]}
        return arrays, meta


# --- the index -------------------------------------------------------------------------------------


def _shard_meta(out: Path, number: int, files: list[str]) -> Optional[dict[str, Any]]:
    """A complete shard's shard.json, or None when the shard is missing or incomplete."""
    directory = out / shard_name(number)
    if not all((directory / name).is_file() for name in files):
        return None
    try:
        return json.loads((directory / SHARD_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _scan(out: Path, numbers: range | list[int], files: list[str], known: dict[int, dict[str, Any]]) -> None:
    for number in numbers:
        if number not in known:
            meta = _shard_meta(out, number, files)
            if meta is not None:
                known[number] = meta


def _index(header: dict[str, Any], known: dict[int, dict[str, Any]], complete: bool) -> dict[str, Any]:
    numbers = sorted(known)
    bad_files = [path for number in numbers for path in known[number]["bad_files"]]
    index = {key: header[key] for key in ("format", "autoencoder", "latent_scale", "latent_shift", "resolution", "latent_shape")}
    index["count"] = sum(known[number]["count"] for number in numbers)
    index.update(flip=header["flip"], shard_size=header["shard_size"])
    index["shards"] = [{"name": shard_name(number), "count": known[number]["count"]} for number in numbers]
    index["text"] = header["text"]
    index.update(bad_images=len(bad_files), bad_files=bad_files[:MAX_LISTED_BAD_FILES])
    index.update({key: header[key] for key in ("source", "num_shards", "num_files", "files_digest")})
    index["complete"] = complete
    return index


def _check_existing(out: Path, header: dict[str, Any]) -> None:
    """An existing --out must be latents from this autoencoder with these settings (then we resume)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunDirError(f"{out} is a file; choose a directory for --out")
    index_path = out / INDEX_FILE
    if not index_path.is_file():
        if any(not entry.name.startswith(TMP_PREFIX) for entry in out.iterdir()):
            raise RunDirError(f"{out} exists and is not a latent dataset; choose an empty or new --out")
        return
    try:
        saved = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise RunDirError(f"{out} holds an index.json that is not an {FORMAT} index; choose another --out")
    old_hash, new_hash = str((saved.get("autoencoder") or {}).get("content_hash")), header["autoencoder"]["content_hash"]
    if old_hash != new_hash:
        raise IncompatibleError(
            f"{out} holds latents encoded with autoencoder {old_hash[:12]}, but --vae {header['autoencoder']['path']} is "
            f"{new_hash[:12]}; choose a new --out (or delete {out} to re-encode)"
        )
    for key in SETTINGS:
        if saved.get(key) != header[key]:
            raise IncompatibleError(
                f"{out} holds latents made with different settings ({key}: saved {saved.get(key)!r}, now {header[key]!r}); "
                "re-run with the same settings to resume, or choose a new --out"
            )


def _remove_stale_temporaries(out: Path) -> None:
    for entry in out.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)


# --- encoding --------------------------------------------------------------------------------------


def _resolution(data: DataConfig, autoencoder: LoadedAutoencoder) -> int:
    """The autoencoder's training resolution, unless data.resolution was set to something else."""
    if data.resolution in (DataConfig.resolution, autoencoder.resolution):
        return autoencoder.resolution
    tqdm.write(f"note: encoding at data.resolution={data.resolution}, not the autoencoder's training resolution {autoencoder.resolution}")
    return data.resolution


def _files_digest(images: ImageFolderDataset) -> str:
    """Identifies the file list: shards are positions in it, so it must not change between runs."""
    names = "\n".join(path.relative_to(images.root).as_posix() for path in images.paths)
    return hashlib.sha256(names.encode("utf-8")).hexdigest()


class _Encoder:
    """One batch of images (and captions) → float32 posterior moments (and float16 text embeddings)."""

    def __init__(self, autoencoder: LoadedAutoencoder, text_encoder: Optional[TextEncoder], flip: bool, precision: str, device: torch.device) -> None:
        self.model, self.text_encoder, self.flip = autoencoder.model, text_encoder, flip
        self.precision, self.device = precision, device
        # channels_last is what cuDNN's fastest convolutions want; the CPU gains nothing from it
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
        pixels = images.to(self.device, non_blocking=True)
        if self.flip:  # the encoding of the flipped image (a flipped latent is not the same thing)
            pixels = torch.cat([pixels, pixels.flip(-1)])
        with autocast(self.precision, self.device):
            posterior = self.model.encode(pixels.contiguous(memory_format=self.memory_format))
        mean, logvar = posterior.mean.float().cpu().numpy(), posterior.logvar.float().cpu().numpy()
        count = len(images)
        out = {"mean": mean[:count], "logvar": logvar[:count]}
        if self.flip:
            out.update(mean_flip=mean[count:], logvar_flip=logvar[count:])
        if self.text_encoder is not None:
            out["text"] = self.text(captions)
        return out

    @torch.inference_mode()
    def text(self, captions: list[str]) -> np.ndarray:
        # full precision: cached embeddings must equal what training would compute live
        embeddings = self.text_encoder.encode(captions)
        return embeddings.float().cpu().numpy().astype(np.float16)


def encode_dataset(
    vae: str | Path | LoadedAutoencoder,
    config: EncodeConfig,
    out: str | Path,
    cache_text: bool = False,
    device_name: str = "auto",
) -> dict[str, Any]:
    """Encode `config.data` into a latent dataset in `out` (resuming one that is there); returns its index."""
    if config.batch_size < 1 or config.shard_size < 1:
        raise ConfigError(f"batch_size and shard_size must be positive, got {config.batch_size} and {config.shard_size}")
    device = resolve_device(device_name)
    with distributed(device, config.dist_timeout_minutes) as dist:
        return _encode_dataset(vae, config, Path(out), cache_text, device_for(device, dist), dist)


def _encode_dataset(
    vae: str | Path | LoadedAutoencoder, config: EncodeConfig, out: Path, cache_text: bool, device: torch.device, dist: DistInfo
) -> dict[str, Any]:
    precision = resolve_precision(config.precision, device)
    autoencoder = vae if isinstance(vae, LoadedAutoencoder) else load_autoencoder(vae)
    resolution = _resolution(config.data, autoencoder)
    factor = autoencoder.downsampling_factor
    if resolution % factor:
        raise ConfigError(f"data.resolution={resolution} is not a multiple of the autoencoder's downsampling factor {factor}")
    root = on_main(dist, lambda: resolve_data_root(config.data, out.parent))  # may generate the shapes set
    root = resolve_data_root(config.data, out.parent) if root is None else root
    images = ImageFolderDataset(root, resolution, crop="center", random_flip=False, split="all")
    text_encoder = load_text_encoder(config.text_encoder, device=device) if cache_text else None

    latent_shape = [autoencoder.latent_channels, resolution // factor, resolution // factor]
    num_shards = math.ceil(len(images) / config.shard_size)
    header = {
        "format": FORMAT,
        "autoencoder": {"content_hash": autoencoder.bundle.content_hash, "path": str(autoencoder.bundle.path.resolve())},
        "latent_scale": autoencoder.latent_scale,
        "latent_shift": autoencoder.latent_shift,
        "resolution": resolution,
        "latent_shape": latent_shape,
        "flip": config.flip,
        "shard_size": config.shard_size,
        "text": None if text_encoder is None else {
            "config": to_dict(config.text_encoder), "width": text_encoder.width, "max_length": text_encoder.max_length,
        },
        "source": str(Path(root).resolve()),
        "num_shards": num_shards,
        "num_files": len(images),
        "files_digest": _files_digest(images),
    }
    files = shard_files(config.flip, cache_text)
    encoder = _Encoder(autoencoder, text_encoder, config.flip, precision, device)
    known: dict[int, dict[str, Any]] = {}

    def prepare() -> None:
        _check_existing(out, header)
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        if text_encoder is not None and not (out / UNCOND_FILE).is_file():
            _write_npy_atomic(out / UNCOND_FILE, encoder.text([""]))
        _scan(out, range(num_shards), files, known)
        _write_json_atomic(out / INDEX_FILE, _index(header, known, complete=len(known) == num_shards))

    on_main(dist, prepare)
    pending = [number for number in shards_for_rank(num_shards, dist.rank, dist.world_size) if _shard_meta(out, number, files) is None]
    _encode_shards(images, encoder, config, out, pending, header, known, dist, files)
    barrier(dist)

    def finish() -> dict[str, Any]:
        _scan(out, range(num_shards), files, known)
        index = _index(header, known, complete=len(known) == num_shards)
        _write_json_atomic(out / INDEX_FILE, index)
        if not index["complete"]:
            raise DataError(f"{num_shards - len(known)} of {num_shards} shards in {out} are missing; re-run `ldm encode` to finish")
        if index["bad_images"]:
            tqdm.write(f"warning: skipped {index['bad_images']} unreadable image(s): {', '.join(index['bad_files'][:5])}")
        return index

    index = on_main(dist, finish)
    barrier(dist)  # the index is written before the other processes read it
    return index if dist.is_main else json.loads((out / INDEX_FILE).read_text())


def _encode_shards(
    images: ImageFolderDataset,
    encoder: _Encoder,
    config: EncodeConfig,
    out: Path,
    pending: list[int],
    header: dict[str, Any],
    known: dict[int, dict[str, Any]],
    dist: DistInfo,
    files: list[str],
) -> None:
    size, num_items = config.shard_size, len(images)
    batches = plan_batches(pending, size, num_items, config.batch_size)
    buffers = {}
    for number in pending:
        items = shard_items(number, size, num_items)
        buffers[number] = _ShardBuffer(number, items, batches=math.ceil(len(items) / config.batch_size))
    empty = {name: np.zeros((0, *header["latent_shape"]), np.float32) for name in ("mean", "logvar")}
    if config.flip:
        empty.update(mean_flip=empty["mean"], logvar_flip=empty["logvar"])
    if header["text"] is not None:
        empty["text"] = np.zeros((0, header["text"]["max_length"], header["text"]["width"]), np.float16)
    if not batches:
        return
    loader = DataLoader(
        _ImagesOrErrors(images), batch_sampler=batches, collate_fn=_collate,
        num_workers=config.data.num_workers, pin_memory=encoder.device.type == "cuda",
    )
    progress = tqdm(total=sum(len(b.items) for b in buffers.values()), desc="encode", unit="img", disable=not dist.is_main, dynamic_ncols=True)
    for batch in loader:
        buffer = buffers[batch["first"] // size]
        for index, error in batch["bad"]:
            buffer.bad_files.append(images.paths[index].relative_to(images.root).as_posix())
            tqdm.write(f"skipping unreadable image: {error}")
        if batch["images"] is not None:
            captions = [images.captions[i] for i in batch["indices"]]
            paths = [images.paths[i].relative_to(images.root).as_posix() for i in batch["indices"]]
            buffer.add(encoder(batch["images"], captions), captions, paths)
        progress.update(len(batch["indices"]) + len(batch["bad"]))
        buffer.batches_left -= 1
        if buffer.batches_left == 0:
            arrays, meta = buffer.finish(empty)
            write_shard(out, buffer.number, arrays, meta)
            del buffers[buffer.number]
            if dist.is_main:  # a partial index, valid for the shards complete so far
                known[buffer.number] = {"count": len(meta["paths"]), "bad_files": meta["bad_files"]}
                if dist.enabled:
                    _scan(out, range(header["num_shards"]), files, known)  # the other processes' shards
                _write_json_atomic(out / INDEX_FILE, _index(header, known, complete=False))
    progress.close()
