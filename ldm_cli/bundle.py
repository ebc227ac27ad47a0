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
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

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
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)
_verified_hashes: Optional["VerifiedHashes"] = None  # this process's, for the cache folder it was read from


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

    def tensors(self, name: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The weights of one file, after checking them against the sha256 that bundle.json records;
        floating-point ones in `dtype` when given."""
        path = self.file(name)
        verify_sha256(path, self.meta.get("hashes", {}).get(name))
        return read_safetensors(path, device, dtype)


def verify_sha256(path: Path, expected: str | None) -> None:
    """Refuse a weight file whose bytes are not the ones the bundle was written with.

    A file already verified (or written by ldm) is not read again while its size, inode, mtime and
    ctime are unchanged: `verified_hashes` remembers them across processes, as git's index does, so
    an SD-size model is hashed once, not at every start. Any write to the file changes its ctime."""
    if not path.is_file():
        raise BundleError(f"weights file {path} is missing")
    if expected is None:
        raise BundleError(f"{path.parent / BUNDLE_JSON} records no sha256 for {path.name}; the bundle is incomplete")
    if verified_hashes().get(path) == expected:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise BundleError(
            f"weights file {path} is corrupt: its sha256 is {actual[:12]}…, {BUNDLE_JSON} records {str(expected)[:12]}…; "
            "restore the file or re-create the bundle"
        )
    verified_hashes().remember(path, actual)


class VerifiedHashes:
    """sha256s of files checked before, keyed by the file's identity and change stamps, in a small JSON
    file under the user's cache folder (`LDM_CACHE_DIR`, else `$XDG_CACHE_HOME/ldm`, else ~/.cache/ldm).
    A cache that cannot be read or written only costs a re-hash."""

    MAX_ENTRIES = 512

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            entries = json.loads(file.read_text())
            self.entries: dict[str, str] = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def stamp(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"

    def get(self, path: Path) -> Optional[str]:
        return self.entries.get(self.stamp(path))

    def remember(self, path: Path, sha256: str) -> None:
        self.entries[self.stamp(path)] = sha256
        self.entries = dict(list(self.entries.items())[-self.MAX_ENTRIES:])
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            staged = self.file.with_name(f".{self.file.name}.{os.getpid()}")
            staged.write_text(json.dumps(self.entries))
            os.replace(staged, self.file)
        except OSError:
            pass


def verified_hashes() -> VerifiedHashes:
    global _verified_hashes
    root = os.environ.get("LDM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm"
    file = Path(root).expanduser() / "verified-sha256.json"
    if _verified_hashes is None or _verified_hashes.file != file:
        _verified_hashes = VerifiedHashes(file)
    return _verified_hashes


def build_from_weights(build: Callable[[], ModuleT], weights: dict[str, torch.Tensor], what: str) -> ModuleT:
    """The model `build` describes, holding `weights` themselves (their dtype and device, no copy).

    It is built on the meta device: no random initialisation, no second copy of the weights, and a
    bundle.json claiming a huge architecture is refused before anything is allocated."""
    with torch.device("meta"):
        model = build()
    check_shapes(model, weights, what)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def check_shapes(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Compare the weights with `model`'s state dict (names and shapes), naming the first difference."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
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


# safetensors' dtype names (the format's spec)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors(path: Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; floating-point ones cast to `dtype` when given.

    The file is memory-mapped copy-on-write, so loading reads nothing until a weight is used, and
    writing to a tensor copies only the pages written (the file never changes). A tensor kept as stored
    (CPU, same dtype) views the map; a cast or another device is one copy straight out of it. When a
    tensor is freed (e.g. replaced by its packed or converted copy), the pages that only it covers leave
    resident memory at once, and the map closes with the file's last tensor."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"weights file {path} is missing")
    tensors = {}
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_bytes = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_bytes <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {header_bytes} bytes in a file of {size}")
            header = json.loads(handle.read(header_bytes))
            data_start = 8 + header_bytes
            ranges = []
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                kind, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
                count = math.prod(shape)
                if not 0 <= begin <= end <= size - data_start or end - begin != count * kind.itemsize:
                    raise ValueError(f"tensor {key} lies outside the file or does not fit its shape")
                ranges.append((begin, end, key, kind, shape))
            ranges.sort(key=lambda entry: entry[:2])
            if any(end > next_begin for (_, end, *_), (next_begin, *_) in zip(ranges, ranges[1:])):
                raise ValueError("two tensors share bytes")  # freeing one would drop the other's written pages
            view = _MappedFile(handle, size) if ranges and ranges[-1][1] > ranges[0][0] else None
            for begin, end, key, kind, shape in ranges:
                raw = view.tensor(data_start + begin, end - begin) if begin < end else torch.empty(0, dtype=torch.uint8)
                tensor = raw.view(kind).reshape(shape)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[key] = tensor.to(device)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"weights file {path} is corrupt or truncated ({error})") from error
    return {key: tensors[key] for key in header if key in tensors}  # the file's order


class _MappedFile:
    """A private (copy-on-write) map of a whole file handing out tensors over byte ranges of it. When a
    range's last tensor is freed, the pages lying wholly inside it are dropped from resident memory
    (madvise DONTNEED: a later read would find the file's bytes again)."""

    def __init__(self, handle: Any, size: int) -> None:
        self.map = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
        self.view = memoryview(self.map)

    def tensor(self, offset: int, length: int) -> torch.Tensor:
        piece = self.view[offset : offset + length]
        first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # pages wholly inside the range: no neighbour shares them
        last = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and hasattr(self.map, "madvise"):
            release = weakref.finalize(piece, self.map.madvise, mmap.MADV_DONTNEED, first, last - first)
            release.atexit = False
        return torch.frombuffer(piece, dtype=torch.uint8)


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
    for name, sha256 in hashes.items():  # hashed as written: loading it need not read it again
        verified_hashes().remember(directory / files[name], sha256)
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
