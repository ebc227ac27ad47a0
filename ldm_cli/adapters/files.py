"""Read a LoRA file of any supported layout into `LoraLayer`s keyed by the file's own layer names.

Layouts:
    kohya / AUTOMATIC1111   `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
                            text encoder `lora_te_…`; conv (LoCon) layers have 4-D down/up weights
    diffusers / PEFT        `unet.<path>.lora_A.weight`, `.lora_B.weight` (+ `text_encoder.…`); alpha
                            from the `lora_adapter_metadata` diffusers writes (else alpha = rank)

LyCORIS types other than plain LoRA/LoCon (LoHa, LoKr, …) are refused by name. Names are resolved
against a model in `targets.py`; this module never needs the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import Tensor

from ldm_cli.adapters.layers import LoraLayer
from ldm_cli.bundle import file_sha256
from ldm_cli.errors import BundleError, UsageError

KOHYA, PEFT = "kohya", "peft"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the peft LoraConfig of each part
# key fragment → the LyCORIS network type it belongs to
LYCORIS_TYPES = (
    ("hada_w1", "LoHa"), ("hada_t1", "LoHa"), ("lokr_w1", "LoKr"), ("lokr_w2", "LoKr"), ("oft_blocks", "OFT"),
    ("oft_diag", "OFT"), ("lora_mid", "LoCon with Tucker decomposition (lora_mid)"), ("dora_scale", "DoRA"),
    (".diff", "full weight difference (LyCORIS 'full')"), (".a1.weight", "GLoRA"), (".on_input", "(IA)^3"),
)
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
SPEC = re.compile(r"^(?P<path>.+?)(?::(?P<scale>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?$")


@dataclass
class LoraFile:
    """A LoRA file's layers (by the file's layer names), its layout and its safetensors metadata."""

    path: Path
    layout: str  # KOHYA or PEFT
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]


@dataclass(frozen=True)
class LoraSpec:
    """`--lora FILE[:SCALE]`: a file and the strength it is applied with."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        match = SPEC.match(text.strip())
        if not text.strip() or match is None:
            raise UsageError(f"--lora {text!r}: give FILE or FILE:SCALE (e.g. style.safetensors:0.8)")
        scale = float(match["scale"]) if match["scale"] is not None else 1.0
        return cls(Path(match["path"]).expanduser(), scale)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def read_lora_file(path: str | Path) -> LoraFile:
    """Read and sort the layers of a LoRA .safetensors file; one clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"LoRA file not found: {path}")
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"LoRA {path}: only .safetensors LoRA files are read (pickled .pt/.ckpt files can run code)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise BundleError(f"LoRA file {path} is corrupt or truncated ({error})") from error
    _refuse_lycoris(path, tensors)
    if any(key.endswith(KOHYA_SUFFIXES[0]) for key in tensors):
        layout, layers = KOHYA, _kohya_layers(path, tensors)
    elif any(key.endswith(PEFT_SUFFIXES[0]) for key in tensors):
        layout, layers = PEFT, _peft_layers(path, tensors, metadata)
    else:
        first = next(iter(tensors), "(no tensors)")
        raise UsageError(f"LoRA {path} is in no layout ldm reads (kohya lora_down/lora_up or PEFT lora_A/lora_B); first key: {first}")
    return LoraFile(path, layout, layers, metadata, file_sha256(path))


def _refuse_lycoris(path: Path, tensors: dict[str, Tensor]) -> None:
    for key in tensors:
        for fragment, kind in LYCORIS_TYPES:
            if fragment in key:
                raise UsageError(f"LoRA {path} is a LyCORIS {kind} network (key {key}); ldm applies LoRA and LoCon only")


def _kohya_layers(path: Path, tensors: dict[str, Tensor]) -> dict[str, LoraLayer]:
    return _paired_layers(path, tensors, KOHYA_SUFFIXES, "kohya", lambda name, rank: float(rank))


def _peft_layers(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, LoraLayer]:
    configs = _peft_configs(path, metadata)
    # older diffusers files carried kohya-style alphas
    return _paired_layers(path, tensors, (*PEFT_SUFFIXES, ".alpha"), "diffusers/PEFT",
                          lambda name, rank: _peft_alpha(name, rank, configs))


def _paired_layers(
    path: Path, tensors: dict[str, Tensor], suffixes: tuple[str, ...], layout: str, default_alpha: Callable[[str, int], float]
) -> dict[str, LoraLayer]:
    """One layer per (down, up) pair named by `suffixes` (down, up, ...); a stored `.alpha` wins over `default_alpha`."""
    down_suffix, up_suffix = suffixes[:2]
    layers = {}
    for key in tensors:
        name, suffix = _split_suffix(key, suffixes)
        if suffix is None:
            raise UsageError(f"LoRA {path}: unexpected key {key} in a {layout}-layout file")
        if suffix != down_suffix:
            continue
        up = tensors.get(name + up_suffix)
        if up is None:
            raise UsageError(f"LoRA {path}: {key} has no matching {name}{up_suffix}")
        down = tensors[key]
        alpha = tensors.get(name + ".alpha")
        layers[name] = LoraLayer(down, up, float(alpha) if alpha is not None else default_alpha(name, int(down.shape[0])))
    return layers


def _peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """{part prefix: its LoraConfig fields} from diffusers' `lora_adapter_metadata` (`unet.lora_alpha`, …)."""
    text = metadata.get(PEFT_METADATA_KEY)
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except json.JSONDecodeError as error:
        raise BundleError(f"LoRA {path}: its {PEFT_METADATA_KEY} metadata is not JSON ({error})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        configs.setdefault(part, {})[name] = value
    return configs


def _peft_alpha(name: str, rank: int, configs: dict[str, dict]) -> float:
    """The alpha that gives peft's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) as alpha / rank."""
    part, _, module = name.partition(".")
    config = configs.get(part)
    if not config:
        return float(rank)  # diffusers' convention when a file carries no config
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = float(value)
    if config.get("use_rslora"):
        alpha = alpha * rank**0.5
    return alpha


def _split_suffix(key: str, suffixes: tuple[str, ...]) -> tuple[str, str | None]:
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, None
