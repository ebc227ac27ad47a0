"""The index of a latent dataset being written: which shards are complete, `index.json` built
from them, and whether an existing directory may be resumed with this run's settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from ldm_cli.errors import IncompatibleError, RunDirError
from ldm_cli.latents.dataset import FORMAT, INDEX_FILE, SHARD_META, shard_name
from ldm_cli.latents.shards import TMP_PREFIX

MAX_LISTED_BAD_FILES = 100
# What a re-run must share with the latents already in the directory to add shards to them.
SETTINGS = ("latent_scale", "latent_shift", "resolution", "latent_shape", "flip", "shard_size", "text", "num_files", "files_digest", "buckets")


def shard_meta(out: Path, number: int, files: list[str]) -> Optional[dict[str, Any]]:
    """A complete shard's shard.json, or None when the shard is missing or incomplete."""
    directory = out / shard_name(number)
    if not all((directory / name).is_file() for name in files):
        return None
    try:
        return json.loads((directory / SHARD_META).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def scan(out: Path, numbers: range | list[int], files: list[str], known: dict[int, dict[str, Any]]) -> None:
    """Add to `known` the shard.json of every complete shard among `numbers` it does not hold yet."""
    for number in numbers:
        if number not in known:
            meta = shard_meta(out, number, files)
            if meta is not None:
                known[number] = meta


def build_index(header: dict[str, Any], known: dict[int, dict[str, Any]], complete: bool) -> dict[str, Any]:
    """index.json's contents: the run's header and the shards complete so far."""
    numbers = sorted(known)
    bad_files = [path for number in numbers for path in known[number]["bad_files"]]
    index = {key: header[key] for key in ("format", "autoencoder", "latent_scale", "latent_shift", "resolution", "latent_shape")}
    index["count"] = sum(known[number]["count"] for number in numbers)
    index.update(flip=header["flip"], shard_size=header["shard_size"])
    index["shards"] = [{"name": shard_name(number), "count": known[number]["count"]} for number in numbers]
    if header["buckets"] is not None:
        for shard, number in zip(index["shards"], numbers):
            shard["latent_shape"] = header["shard_shapes"][number]
        counts: dict[tuple[int, int], int] = {}
        for number in numbers:
            size = tuple(header["shard_sizes"][number])
            counts[size] = counts.get(size, 0) + known[number]["count"]
        index["bucket_counts"] = [{"size": list(size), "count": count} for size, count in sorted(counts.items())]
    index["text"] = header["text"]
    index.update(bad_images=len(bad_files), bad_files=bad_files[:MAX_LISTED_BAD_FILES])
    index.update({key: header[key] for key in ("source", "num_shards", "num_files", "files_digest", "buckets")})
    index["complete"] = complete
    return index


def check_existing(out: Path, header: dict[str, Any]) -> None:
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


def remove_stale_temporaries(out: Path) -> None:
    """Delete what an interrupted run left half-written."""
    for entry in out.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
