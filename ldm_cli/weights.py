"""Pretrained weight files: local path → cache → download, verified, or one line saying what to do.

A weight file that is missing from its cache (torch hub's `checkpoints/`, as torchvision and
pytorch-fid use) is fetched once from its published URL with a progress bar, hashed while it
streams into `<name>.<pid>.part`, and renamed into place only when its sha256 matches (the full
published digest, or torchvision's 8-hex-digit prefix in the file name): a killed download leaves
a `.part` file that nothing ever reads. Offline (`--offline`, `LDM_OFFLINE=1`, `HF_HUB_OFFLINE=1`)
nothing touches the network; a network failure gets one attempt with timeouts, then the same
one-line error naming the file, where to get it and the setting that points to a local copy.
`LDM_WEIGHTS_MIRROR=<base URL>` fetches every file as `<base URL>/<file name>` instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ldm_cli.errors import MissingWeightsError

CONNECT_TIMEOUT_S = 15.0  # per socket operation: a dead network fails in seconds, never hangs
CHUNK_BYTES = 1 << 20
OFFLINE_VARIABLES = ("LDM_OFFLINE", "HF_HUB_OFFLINE")
MIRROR_VARIABLE = "LDM_WEIGHTS_MIRROR"
_HASH_PREFIX = re.compile(r"-([a-f0-9]{8,})\.")  # torchvision's `name-<sha256 prefix>.pth`

Origin = Literal["local path", "package", "cache", "download"]


@dataclass(frozen=True)
class WeightFile:
    """One published weight file: where it is cached, where it comes from, how it is verified."""

    title: str  # what it is, for messages: "VGG16 (LPIPS backbone)"
    filename: str  # its name in the cache folder
    url: str
    setting: str  # the setting that points to a local copy instead, e.g. "loss.lpips_vgg_path"
    sha256: Optional[str] = None  # the full published digest; else the file name's prefix is checked
    verify_prefix: bool = True  # False where the file name's hex part is not a hash of the file
    alternative: str = ""  # another way out, appended to the missing-file line

    def expected_digest(self) -> Optional[str]:
        """The sha256 (or its leading hex digits) a download must have; None when none is published."""
        if self.sha256:
            return self.sha256
        match = _HASH_PREFIX.search(self.filename) if self.verify_prefix else None
        return match.group(1) if match else None


@dataclass(frozen=True)
class Resolved:
    """Where a weight file is (or will be) read from, and how it got there."""

    path: Path
    origin: Origin
    url: Optional[str] = None  # set when origin is "download": fetched, or to be fetched

    def describe(self) -> str:
        if self.origin == "download":
            if is_offline():
                return f"{self.path} (missing, and offline: nothing is downloaded)"
            return f"{self.path} (to be downloaded from {self.url})"
        return f"{self.path} ({self.origin})"


def is_offline() -> bool:
    """True when the user asked for no network (LDM_OFFLINE or HF_HUB_OFFLINE set to a true value)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def set_offline() -> None:
    """What `--offline` does: set both switches, so the Hugging Face libraries stay offline too."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"


def cache_dir() -> Path:
    """torch hub's `checkpoints/` folder (TORCH_HOME honoured), shared with torchvision and pytorch-fid."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def source_url(spec: WeightFile) -> str:
    mirror = os.environ.get(MIRROR_VARIABLE, "").strip()
    return f"{mirror.rstrip('/')}/{spec.filename}" if mirror else spec.url


def locate(spec: WeightFile, explicit: str | os.PathLike | None = None) -> Resolved:
    """Where the file would come from, without reading or fetching anything (for start-up lines)."""
    if explicit is not None:
        return Resolved(Path(explicit).expanduser(), "local path")
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return Resolved(cached, "cache")
    return Resolved(cached, "download", source_url(spec))


def fetch(spec: WeightFile, explicit: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local path of `spec`: the explicit file, the cached one, or a freshly downloaded and verified one."""
    where = locate(spec, explicit)
    if where.origin == "local path":
        if not where.path.is_file():
            raise MissingWeightsError(f"{spec.title}: {spec.setting}={where.path} does not exist")
        return where.path
    if where.origin == "cache":
        return where.path
    if is_offline():
        raise _missing(spec, where, "is not on this machine and downloads are off (offline)")
    from ldm_cli.training.distributed import env_info

    try:
        show = progress and env_info().is_main  # one progress bar under torchrun, not one per process
        download(where.url or spec.url, where.path, spec.expected_digest(), progress=show, title=spec.title)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise _missing(spec, where, f"could not be downloaded ({_reason(error)})") from error
    return where.path


def download(url: str, target: Path, digest: Optional[str], progress: bool = True, title: str = "") -> None:
    """Stream `url` into `target` atomically; a digest mismatch deletes the download and raises."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    sha = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ldm-cli"})
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response, open(part, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=title or target.name, disable=not progress) as bar:
                while chunk := response.read1(CHUNK_BYTES):  # what has arrived, not a full chunk
                    handle.write(chunk)
                    sha.update(chunk)
                    bar.update(len(chunk))
            if total is not None and handle.tell() != total:
                raise OSError(f"connection closed after {handle.tell()} of {total} bytes")
        found = sha.hexdigest()
        if digest is not None and not found.startswith(digest.lower()):
            raise MissingWeightsError(
                f"{title or target.name} downloaded from {url} has sha256 {found[:16]}…, expected {digest[:16]}…; "
                "the file was deleted (a proxy or a changed upload?) — fetch it by hand and point to it instead"
            )
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def package_file(package: str, relative: str) -> Optional[Path]:
    """A data file inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    return None


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def _missing(spec: WeightFile, where: Resolved, problem: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{spec.title} {where.path} {problem}; download {where.url or spec.url} to that path on a machine "
        f"with internet and copy it here, or set {spec.setting}=/path/to/{spec.filename}{spec.alternative}"
    )


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return " ".join(str(reason).split())[:160]


def config_sources(config: object, text_encoder: bool = True) -> list[tuple[str, Resolved]]:
    """(title, where from) of every pretrained file a composed command config will load."""
    sources: list[tuple[str, Resolved]] = []
    loss = getattr(config, "loss", None)
    if loss is not None and getattr(loss, "perceptual_weight", 0) > 0:
        from ldm_cli.autoencoder.lpips import lpips_sources

        sources += lpips_sources(loss.lpips_vgg_path, loss.lpips_heads_path)
    encoder = getattr(config, "text_encoder", None)
    if encoder is not None and text_encoder:
        from ldm_cli.diffusion.text import text_encoder_source

        where = text_encoder_source(encoder)
        if where is not None:
            sources.append((f"text encoder {encoder.pretrained}", where))
    return sources


def describe_sources(sources: list[tuple[str, Resolved]]) -> list[str]:
    return [f"{title}: {where.describe()}" for title, where in sources]
