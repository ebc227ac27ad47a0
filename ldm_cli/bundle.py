"""Self-describing model bundles: safetensors weights + `bundle.json` (kind, configs, hashes).

A bundle is what one stage hands to the next. The JSON names everything the next stage needs
(architecture configs, latent scale, schedule, text encoder, the autoencoder it was trained with),
so a user never re-types a config. Bundles are written atomically: a crash mid-write leaves the
previous bundle in place. A bundle never holds a NaN or infinite weight, and each weight file is
checked against its recorded sha256 when it is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ldm_cli import __version__
from ldm_cli.errors import BundleError

BUNDLE_JSON = "bundle.json"
KINDS = ("autoencoder", "latent-diffusion")
# what loading a model of each kind reads from bundle.json
MODEL_KEYS = {
    "autoencoder": ("autoencoder", "latent_scale", "resolution"),
    "latent-diffusion": ("unet", "schedule", "text_encoder", "autoencoder", "resolution"),
}
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256 already checked in this process


@dataclass
class Bundle:
    path: Path  # the directory holding bundle.json
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]

    def file(self, name: str) -> Path:
        try:
            return self.path / self.meta["files"][name]
        except KeyError:
            raise BundleError(f"bundle {self.path} has no '{name}' entry (it has: {', '.join(self.meta.get('files', {}))})") from None

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The weights of one file, after checking them against the sha256 that bundle.json records."""
        path = self.file(name)
        verify_sha256(path, self.meta.get("hashes", {}).get(name))
        return read_safetensors(path, device)


def verify_sha256(path: Path, expected: str | None) -> None:
    """Refuse a weight file whose bytes are not the ones the bundle was written with."""
    if not path.is_file():
        raise BundleError(f"weights file {path} is missing")
    if expected is None:
        raise BundleError(f"{path.parent / BUNDLE_JSON} records no sha256 for {path.name}; the bundle is incomplete")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _verified.get(key) == expected:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise BundleError(
            f"weights file {path} is corrupt: its sha256 is {actual[:12]}…, {BUNDLE_JSON} records {str(expected)[:12]}…; "
            "restore the file or re-create the bundle"
        )
    _verified[key] = actual


def check_shapes(build: Callable[[], torch.nn.Module], weights: dict[str, torch.Tensor], what: str) -> None:
    """Compare the weights with the model a config describes, built on the meta device (no memory),
    so a bundle.json claiming a huge architecture is refused before anything is allocated."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build().state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise BundleError(f"{what} weights do not match its config in {BUNDLE_JSON} ({len(missing)} missing, {len(unexpected)} unexpected, e.g. {first})")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise BundleError(
                f"{what} weights do not match its config in {BUNDLE_JSON}: {key} is {tuple(weights[key].shape)} in the file, "
                f"the config makes it {shape}"
            )


def check_finite(weights: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Refuse to ship NaN or infinite weights or numbers: they would sample black images."""
    for name, tensors in weights.items():
        for key, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise BundleError(f"refusing to write a bundle: {name} weight {key} holds NaN or infinite values")
    for key, value in meta.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BundleError(f"refusing to write a bundle: {key} is {value}")


def normal_mode(path: Path, directory: bool = False) -> None:
    """Give a file or folder the umask's usual mode (mkdtemp and safetensors create private ones)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise BundleError(f"weights file {path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"weights file {path} is corrupt or truncated ({error})") from error


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    save_file(contiguous, str(path), metadata=metadata)
    normal_mode(Path(path))


def write_bundle(
    directory: str | Path,
    kind: str,
    weights: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    folders: dict[str, Path] | None = None,
) -> Bundle:
    """Write `weights` (one safetensors file per entry) and `meta` into `directory`, atomically.

    `folders` are copied in as they are (e.g. a text encoder in Hugging Face layout).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown bundle kind {kind!r}")
    check_finite(weights, meta)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    normal_mode(staging, directory=True)
    try:
        files, hashes = {}, {}
        for name, tensors in weights.items():
            filename = f"{name}.safetensors"
            write_safetensors(tensors, staging / filename, metadata={"kind": kind, "part": name})
            files[name], hashes[name] = filename, file_sha256(staging / filename)
        for name, source in (folders or {}).items():
            shutil.copytree(source, staging / name)
            files[name] = name
        content_hash = hashlib.sha256("".join(hashes[k] for k in sorted(hashes)).encode()).hexdigest()
        full_meta = {"kind": kind, "ldm_version": __version__, **meta, "files": files, "hashes": hashes, "content_hash": content_hash}
        (staging / BUNDLE_JSON).write_text(json.dumps(full_meta, indent=2, sort_keys=False))
        _fsync_files(staging)
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(directory, full_meta)


def _fsync_files(directory: Path) -> None:
    """Flush the staged files to disk before the rename publishes them (a power cut keeps the old bundle)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is kept aside until the move succeeded."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def find_bundle(path: str | Path) -> Path:
    """Accept a bundle directory, its bundle.json, or a run directory with a `bundle/` inside."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BundleError(f"{path} does not exist")
    for candidate in (path, path / BUNDLE_JSON, path / "bundle" / BUNDLE_JSON):
        if candidate.is_file() and candidate.name == BUNDLE_JSON:
            return candidate.parent
    if (path / "checkpoints").is_dir():
        raise BundleError(f"run {path} has no bundle yet (training did not finish); resume it, or pass a finished run")
    raise BundleError(f"{path} is not an ldm model bundle (no {BUNDLE_JSON} in it or in {path / 'bundle'})")


def load_bundle(path: str | Path, kind: str | None = None) -> Bundle:
    directory = find_bundle(path)
    try:
        meta = json.loads((directory / BUNDLE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{directory / BUNDLE_JSON} is unreadable ({error})") from error
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
        raise BundleError(f"{directory / BUNDLE_JSON} names no known bundle kind")
    if kind is not None and meta["kind"] != kind:
        raise BundleError(f"{directory} is a '{meta['kind']}' bundle, but this command needs a '{kind}' bundle")
    _require(directory, meta, ("files", "hashes", "content_hash"))
    if not isinstance(meta["files"], dict) or not isinstance(meta["hashes"], dict):
        raise BundleError(f"{directory / BUNDLE_JSON}: 'files' and 'hashes' must be mappings; the bundle is damaged")
    return Bundle(directory, meta)


def require_model_keys(bundle: Bundle) -> None:
    """Check that bundle.json holds what building its model reads, naming what is missing."""
    _require(bundle.path, bundle.meta, MODEL_KEYS[bundle.kind])
    meta, where = bundle.meta, bundle.path / BUNDLE_JSON
    sections = ("autoencoder",) if bundle.kind == "autoencoder" else ("unet", "schedule", "text_encoder", "autoencoder")
    for section in sections:
        if not isinstance(meta[section], dict):
            raise BundleError(f"{where}: '{section}' is {meta[section]!r}, not a mapping of settings; the bundle is damaged")
    if bundle.kind == "autoencoder":
        scale = meta["latent_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise BundleError(f"{where}: latent_scale is {scale!r}, not a finite non-zero number; the bundle is damaged")
    reference = bundle.meta["autoencoder"] if bundle.kind == "latent-diffusion" else {"path": "", "content_hash": ""}
    if not isinstance(reference, dict) or not {"path", "content_hash"} <= set(reference):
        raise BundleError(f"{bundle.path / BUNDLE_JSON}: 'autoencoder' must name its path and content_hash; the bundle is damaged")


def _require(directory: Path, meta: dict, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in meta]
    if missing:
        raise BundleError(f"{directory / BUNDLE_JSON} lacks {', '.join(missing)}; the bundle is incomplete, re-create it")
