"""What a generated PNG says about itself: PNG text chunks, written and read back.

Two keys, both plain text:
    "ldm"         JSON with every setting needed to make the same pixels again (`--replay`)
    "parameters"  the AUTOMATIC1111-style line that image viewers and model sites display
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_cli.errors import DataError
from ldm_cli.sampling.settings import SamplingSettings

METADATA_KEY = "ldm"
PARAMETERS_KEY = "parameters"
# what a replay cannot do without
REQUIRED_KEYS = ("mode", "prompt", "negative_prompt", "seed", "steps", "sampler", "guidance_scale",
                 "height", "width", "timestep_spacing", "karras_sigmas", "precision", "model")
# the type of each field outside the sampling settings (SamplingSettings.from_metadata checks those),
# so a crafted PNG gets one line, not a traceback
FIELD_TYPES = (
    ("mode", (str,), "a string"), ("prompt", (str,), "a string"), ("precision", (str,), "a string"),
    ("model", (str,), "a string"), ("seed", (int,), "an integer"),
    ("init_sha256", (str,), "a string"), ("init_image", (str,), "a string"),
)
# AUTOMATIC1111's display names, so model sites and viewers recognise the sampler
A1111_SAMPLER_NAMES = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "ddpm": "DDPM", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE", "lms": "LMS", "unipc": "UniPC",
}


def parameters_line(meta: dict[str, Any]) -> str:
    """`prompt \\n Negative prompt: … \\n Steps: 30, Sampler: …, CFG scale: 7.5, Seed: 1, Size: WxH, …`."""
    fields = [
        ("Steps", meta["steps"]),
        ("Sampler", A1111_SAMPLER_NAMES.get(meta["sampler"], meta["sampler"])),
        ("Schedule type", "Karras" if meta.get("karras_sigmas") else None),
        ("CFG scale", meta["guidance_scale"]),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model hash", (meta.get("model_hash") or "")[:10] or None),
        ("Model", Path(meta["model"]).name if meta.get("model") else None),
        ("Denoising strength", meta.get("strength") if meta["mode"] in ("img2img", "inpaint") else None),
        ("Mask blur", meta.get("mask_blur") if meta["mode"] == "inpaint" else None),
        ("Eta", meta.get("eta")),
        ("Lora hashes", _lora_hashes(meta.get("loras"))),
        ("Clip skip", meta["clip_skip"] if meta.get("clip_skip", 1) != 1 else None),
        ("Version", f"ldm {meta['ldm_version']}" if meta.get("ldm_version") else None),
    ]
    settings = ", ".join(f"{name}: {value}" for name, value in fields if value is not None)
    # AUTOMATIC1111 keeps its LoRAs as prompt tags; other tools read them from there
    tags = "".join(f" <lora:{lora['name']}:{lora['scale']:g}>" for lora in meta.get("loras") or [])
    lines = [meta["prompt"] + tags]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    return "\n".join(lines + [settings])


def _lora_hashes(loras: list[dict[str, Any]] | None) -> str | None:
    if not loras:
        return None
    return '"' + ", ".join(f"{lora['name']}: {lora['sha256'][:12]}" for lora in loras) + '"'


def png_info(meta: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    # iTXt (UTF-8): prompts are not limited to Latin-1
    info.add_itxt(METADATA_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    info.add_itxt(PARAMETERS_KEY, parameters_line(meta))
    return info


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The "ldm" JSON of a PNG written by `ldm sample` / `ldm img2img`; DataError if it has none."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(METADATA_KEY)
    except Exception as error:  # PIL raises assorted types for non-images
        raise DataError(f"cannot read image {path}: {error or type(error).__name__}") from None
    if text is None:
        raise DataError(f"{path} has no '{METADATA_KEY}' metadata; only PNGs written by `ldm sample` or `ldm img2img` can be replayed")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"the '{METADATA_KEY}' metadata of {path} is not valid JSON ({error})") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise DataError(f"the '{METADATA_KEY}' metadata of {path} lacks {', '.join(missing)}; it cannot be replayed")
    if meta["mode"] == "img2img" and not {"init_sha256", "strength"} <= set(meta):
        raise DataError(f"the img2img metadata of {path} lacks the init image's hash or strength; it cannot be replayed")
    for key, kinds, expected in FIELD_TYPES:
        value = meta.get(key)
        if (value is not None or key in REQUIRED_KEYS) and (not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds)):
            raise DataError(f"the '{METADATA_KEY}' metadata of {path} has {key}={value!r}, not {expected}; it cannot be replayed")
    SamplingSettings.from_metadata(meta, source=str(path))  # the settings' own type checks
    return meta
