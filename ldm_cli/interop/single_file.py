"""Read foreign weight files without running their code: safetensors, or legacy pickles (.ckpt, .bin)
through torch's weights-only unpickler, which rebuilds tensors and plain containers and nothing else.

A pickle that needs more (a Lightning callback, a custom class) is refused, never unpickled: the
fix is to convert it to safetensors once, on a machine where running its code is acceptable.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from ldm_cli.errors import BundleError, MissingWeightsError

StateDict = dict[str, torch.Tensor]

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6 writes a zip archive
_PICKLE_PROTOCOL = 0x80  # legacy torch.save: a bare pickle starting with PROTO


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header itself
    return len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def read_checkpoint(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Tensors of a single weights file and its safetensors metadata ({} for pickles).

    Accepts .safetensors, and torch.save'd files (.ckpt/.pt/.pth/.bin) holding a state dict or the
    common {"state_dict": {...}, ...} wrapper; entries that are not tensors are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path} is not a file")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTOCOL]):
        return _tensors_only(_load_weights_only(path), path), {}
    raise BundleError(f"{path} is neither a safetensors file nor a PyTorch checkpoint (.ckpt/.pt/.bin)")


def read_state_dict(path: str | Path) -> StateDict:
    return read_checkpoint(path)[0]


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"{path} is not a readable safetensors file ({error})") from error
    if not tensors:
        raise BundleError(f"{path} holds no tensors")
    return tensors, metadata


def pickled_globals(path: Path) -> list[str]:
    """The `module.name` globals a pickle (bare, or torch's zip archive) would import, read from its
    opcodes without unpickling anything."""
    import io
    import pickletools
    import zipfile

    data = Path(path).read_bytes()
    if data.startswith(_ZIP_MAGIC):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
            data = archive.read(member) if member else b""
    found, strings = [], []
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):  # legacy torch.save: several pickles, then raw storage bytes
            for opcode, argument, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
    except Exception:  # not (or no longer) a pickle: report what was found before
        pass
    return list(dict.fromkeys(found))


def _code_globals(path: Path) -> list[str]:
    """Globals the weights-only unpickler refuses: what loading the file would run or import."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # a torch without the private list: name every global outside torch
        allowed = set()
    safe = {f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}" for g in torch.serialization.get_safe_globals()}
    return [name for name in pickled_globals(path) if name not in allowed | safe and not name.startswith("torch.")]


def _load_weights_only(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        code = _code_globals(path)
        if code or needs or "Unsupported operand" in str(error):
            what = f" (it would run code: {', '.join(code[:3])})" if code else (f" ({needs.group(1)})" if needs else "")
            raise BundleError(
                f"{path} needs arbitrary Python code to load{what} and ldm does not unpickle code; on a machine "
                "where you trust this file, load it with full unpickling, save its state dict with "
                "safetensors.torch.save_file as model.safetensors, and convert that"
            ) from error
        raise BundleError(f"{path} is not a readable PyTorch checkpoint ({_first_line(error)})") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise BundleError(f"{path} is corrupt or truncated ({_first_line(error)})") from error


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _tensors_only(loaded: object, path: Path) -> StateDict:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning / CompVis wrapper
    if not isinstance(loaded, dict):
        raise BundleError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    tensors = {str(key): value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise BundleError(f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(loaded)[:6]))})")
    return tensors


def write_checkpoint(path: str | Path, tensors: StateDict, metadata: dict[str, str] | None = None) -> None:
    """One .safetensors file; tensors only, with string metadata."""
    from ldm_cli.bundle import write_safetensors

    write_safetensors(tensors, Path(path), metadata=metadata)


# --- Hugging Face / diffusers component folders ---------------------------------------------------


def find_weights(folder: str | Path, basename: str) -> list[Path]:
    """The weight file(s) of one diffusers / transformers component folder.

    Prefers `<basename>.safetensors`, then its sharded index, then the fp16 variant, then `.bin`.
    """
    folder = Path(folder)
    for name in (f"{basename}.safetensors", f"{basename}.fp16.safetensors", f"{basename}.bin", f"{basename}.fp16.bin"):
        for candidate in (folder / name, folder / f"{name}.index.json"):
            if candidate.is_file():
                if candidate.name.endswith(".index.json"):
                    return _shards(candidate)
                return [candidate]
    raise MissingWeightsError(
        f"{folder} has no {basename}.safetensors (or .bin) weights; is the download complete?"
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as error:
        raise BundleError(f"{index} is not a readable shard index ({error})") from error
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise MissingWeightsError(f"{index.parent} is missing weight shards {', '.join(missing)}; is the download complete?")
    return shards


def read_folder_weights(folder: str | Path, basename: str) -> StateDict:
    """All tensors of a component folder (`basename`: "diffusion_pytorch_model" or "model")."""
    tensors: StateDict = {}
    for file in find_weights(folder, basename):
        tensors.update(read_state_dict(file))
    return tensors
