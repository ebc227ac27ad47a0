"""Writing a latent dataset's files all or nothing: a shard through a staging directory, JSON and
arrays through a temporary file, each renamed into place only when complete."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ldm_cli.latents.dataset import SHARD_META, shard_name

TMP_PREFIX = ".tmp-"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON through a temporary file and a rename: a reader sees the old file or the new one."""
    temporary = path.with_name(f"{TMP_PREFIX}{path.stem}-{secrets.token_hex(4)}{path.suffix}")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Save `array` as .npy through a temporary file and a rename."""
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
        (staging / SHARD_META).write_text(json.dumps({
            "count": len(meta["paths"]), "items": meta["items"], "bad_files": meta["bad_files"], "latent_shape": meta["latent_shape"],
        }))
        if final.exists():  # an incomplete leftover (a file deleted by hand): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def empty_arrays(latent_shape: list[int], header: dict[str, Any], flip: bool) -> dict[str, np.ndarray]:
    """What a shard holds when none of its images could be read."""
    empty = {name: np.zeros((0, *latent_shape), np.float32) for name in ("mean", "logvar")}
    if flip:
        empty.update(mean_flip=empty["mean"], logvar_flip=empty["logvar"])
    if header["text"] is not None:
        empty["text"] = np.zeros((0, header["text"]["max_length"], header["text"]["width"]), np.float16)
    return empty


class ShardBuffer:
    """Encodings of one shard, gathered batch by batch until its last batch arrives."""

    def __init__(self, number: int, items: list[int], batches: int, latent_shape: list[int], contiguous: bool) -> None:
        self.number, self.items, self.batches_left = number, items, batches
        self.latent_shape, self.contiguous = latent_shape, contiguous
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
        # a square set's shard covers a range of the folder; a bucket's shard lists its items
        items = [self.items[0], self.items[-1] + 1] if self.contiguous else self.items
        meta = {"captions": self.captions, "paths": self.paths, "bad_files": self.bad_files, "items": items, "latent_shape": self.latent_shape}
        return arrays, meta
