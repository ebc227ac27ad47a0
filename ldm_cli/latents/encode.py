"""`ldm encode`: an image folder → a sharded latent dataset (see `dataset.py` for the layout).

Every image is encoded once; we keep the posterior's mean and log-variance so training can draw
a fresh latent each epoch. Which items each shard holds is planned in `plan.py` (square crops, or
aspect-ratio buckets with `data.buckets`).

Crash safety: a shard is written into `.tmp-shard_XXXXX-<random>` and renamed into place only when
complete (`shards.py`), so a reader never sees half a shard; a re-run skips shards already in
place, removes stale temporary files, and refuses a directory made with another autoencoder or
other settings (`index.py`). `index.json` is rewritten (atomically) after every shard and marked
`complete` at the end.

Under torchrun, process r encodes the shards k with k % world_size == r; the main process
writes the index.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm_cli.autoencoder.load import LoadedAutoencoder, bundle_latent_space, load_autoencoder
from ldm_cli.config import EncodeConfig, to_dict
from ldm_cli.data.buckets import Size, cover_crop, histogram
from ldm_cli.data.images import DataConfig, ImageFolderDataset, load_image_rgb, pil_to_tensor, resolve_data_root
from ldm_cli.diffusion.text import TextEncoder, load_text_encoder
from ldm_cli.errors import ConfigError, DataError
from ldm_cli.latents.dataset import FORMAT, INDEX_FILE, UNCOND_FILE, shard_files
from ldm_cli.latents.index import build_index, check_existing, remove_stale_temporaries, scan, shard_meta
from ldm_cli.latents.plan import batches_of, bucket_targets, plan_batches, shard_items, shards_for_rank, square_plan
from ldm_cli.latents.shards import ShardBuffer, empty_arrays, write_json_atomic, write_npy_atomic, write_shard
from ldm_cli.training.distributed import DistInfo, barrier, device_for, distributed, on_main
from ldm_cli.training.precision import autocast, resolve_device, resolve_precision

__all__ = ["encode_dataset", "plan_batches", "shard_items", "shards_for_rank", "write_shard"]


# --- reading images (in DataLoader workers) --------------------------------------------------------


class _ImagesOrErrors(Dataset):
    """Item i of the folder as pixels, or the reason it cannot be read: bad files are skipped, not substituted."""

    def __init__(self, images: ImageFolderDataset, targets: Optional[list[Size]] = None) -> None:
        self.images, self.targets = images, targets  # targets: each item's bucket (width, height)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        try:
            if self.targets is None:
                return index, self.images.load(index), None
            target = self.targets[index]
            image = load_image_rgb(self.images.paths[index], min_size=max(target))
            return index, pil_to_tensor(cover_crop(image, target)), None
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


# captions repeat in templated and tagged sets: each one is encoded once while it stays among the
# most recent this many (about 100 MB for a CLIP-L embedding), so a set of unique captions costs nothing
TEXT_MEMO_SIZE = 4096


class _Encoder:
    """One batch of images (and captions) → float32 posterior moments (and float16 text embeddings)."""

    def __init__(self, autoencoder: LoadedAutoencoder, text_encoder: Optional[TextEncoder], flip: bool, precision: str, device: torch.device) -> None:
        self.model, self.text_encoder, self.flip = autoencoder.model, text_encoder, flip
        self.precision, self.device = precision, device
        # channels_last is what cuDNN's fastest convolutions want; the CPU gains nothing from it
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)
        self.text_memo: OrderedDict[str, np.ndarray] = OrderedDict()

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
        new = list(dict.fromkeys(caption for caption in captions if caption not in self.text_memo))
        if new:
            # full precision: cached embeddings must equal what training would compute live
            embeddings = self.text_encoder.encode(new).float().cpu().numpy().astype(np.float16)
            self.text_memo.update(zip(new, embeddings))
        for caption in captions:
            self.text_memo.move_to_end(caption)
        batch = np.stack([self.text_memo[caption] for caption in captions])
        while len(self.text_memo) > TEXT_MEMO_SIZE:
            self.text_memo.popitem(last=False)
        return batch


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
    images = ImageFolderDataset(root, resolution, crop="center", random_flip=False, split="all",
                                caption_extension=config.data.caption_extension)
    text_encoder = load_text_encoder(config.text_encoder, device=device) if cache_text else None

    channels = autoencoder.latent_channels
    if config.data.buckets:
        targets, plan, sizes, spec = bucket_targets(images, config, resolution, factor)
        shard_shapes = [[channels, height // factor, width // factor] for width, height in sizes]
        (width, height), _ = histogram(targets)[0]  # the most common bucket stands for the set
        latent_shape = [channels, height // factor, width // factor]
    else:
        targets, spec = None, None
        plan = square_plan(len(images), config.shard_size)
        latent_shape = [channels, resolution // factor, resolution // factor]
        sizes, shard_shapes = [(resolution, resolution)] * len(plan), [latent_shape] * len(plan)
    num_shards = len(plan)
    header = {
        "format": FORMAT,
        "autoencoder": {
            "content_hash": autoencoder.bundle.content_hash,
            "latent_space_hash": bundle_latent_space(autoencoder.bundle),
            "path": str(autoencoder.bundle.path.resolve()),
        },
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
        "buckets": spec,
        "shard_shapes": shard_shapes,
        "shard_sizes": [list(size) for size in sizes],
    }
    files = shard_files(config.flip, cache_text)
    encoder = _Encoder(autoencoder, text_encoder, config.flip, precision, device)
    known: dict[int, dict[str, Any]] = {}

    def prepare() -> None:
        check_existing(out, header)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        if text_encoder is not None and not (out / UNCOND_FILE).is_file():
            write_npy_atomic(out / UNCOND_FILE, encoder.text([""]))
        scan(out, range(num_shards), files, known)
        write_json_atomic(out / INDEX_FILE, build_index(header, known, complete=len(known) == num_shards))

    on_main(dist, prepare)
    pending = [number for number in shards_for_rank(num_shards, dist.rank, dist.world_size) if shard_meta(out, number, files) is None]
    _encode_shards(_ImagesOrErrors(images, targets), plan, encoder, config, out, pending, header, known, dist, files)
    barrier(dist)

    def finish() -> dict[str, Any]:
        scan(out, range(num_shards), files, known)
        index = build_index(header, known, complete=len(known) == num_shards)
        write_json_atomic(out / INDEX_FILE, index)
        if not index["complete"]:
            raise DataError(f"{num_shards - len(known)} of {num_shards} shards in {out} are missing; re-run `ldm encode` to finish")
        if index["count"] == 0:
            raise DataError(
                f"none of the {index['num_files']} images in {root} could be read, so {out} holds no latents; "
                f"see `ldm data check {root}`, then encode into a new --out"
            )
        if index["bad_images"]:
            tqdm.write(f"warning: skipped {index['bad_images']} unreadable image(s): {', '.join(index['bad_files'][:5])}")
        return index

    index = on_main(dist, finish)
    barrier(dist)  # the index is written before the other processes read it
    return index if dist.is_main else json.loads((out / INDEX_FILE).read_text())


def _encode_shards(
    reader: _ImagesOrErrors,
    plan: list[list[int]],
    encoder: _Encoder,
    config: EncodeConfig,
    out: Path,
    pending: list[int],
    header: dict[str, Any],
    known: dict[int, dict[str, Any]],
    dist: DistInfo,
    files: list[str],
) -> None:
    images = reader.images
    batches = batches_of(plan, pending, config.batch_size)
    buffers, shard_of = {}, {}
    for number in pending:
        items = plan[number]
        buffers[number] = ShardBuffer(number, items, math.ceil(len(items) / config.batch_size), header["shard_shapes"][number],
                                       contiguous=header["buckets"] is None)
        shard_of.update(dict.fromkeys(items, number))
    if not batches:
        return
    loader = DataLoader(
        reader, batch_sampler=batches, collate_fn=_collate,
        num_workers=config.data.num_workers, pin_memory=encoder.device.type == "cuda",
    )
    progress = tqdm(total=sum(len(b.items) for b in buffers.values()), desc="encode", unit="img", disable=not dist.is_main, dynamic_ncols=True)
    for batch in loader:
        buffer = buffers[shard_of[batch["first"]]]
        for index, error in batch["bad"]:
            buffer.bad_files.append(images.paths[index].relative_to(images.root).as_posix())
            tqdm.write(f"warning: skipping unreadable image: {error}", file=sys.stderr)
        if batch["images"] is not None:
            captions = [images.captions[i] for i in batch["indices"]]
            paths = [images.paths[i].relative_to(images.root).as_posix() for i in batch["indices"]]
            buffer.add(encoder(batch["images"], captions), captions, paths)
        progress.update(len(batch["indices"]) + len(batch["bad"]))
        buffer.batches_left -= 1
        if buffer.batches_left == 0:
            arrays, meta = buffer.finish(empty_arrays(buffer.latent_shape, header, config.flip))
            write_shard(out, buffer.number, arrays, meta)
            del buffers[buffer.number]
            if dist.is_main:  # a partial index, valid for the shards complete so far
                known[buffer.number] = {"count": len(meta["paths"]), "bad_files": meta["bad_files"]}
                if dist.enabled:
                    scan(out, range(header["num_shards"]), files, known)  # the other processes' shards
                write_json_atomic(out / INDEX_FILE, build_index(header, known, complete=False))
    progress.close()
