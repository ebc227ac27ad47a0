"""LoRAs a sampling run applies: `--lora FILE[:SCALE]` options and AUTOMATIC1111's `<lora:name:0.8>`
prompt tags, read once and merged at load, so they hold for the whole run (every prompt of it).

A tag names a `--lora` file by its stem (then the tag sets its scale) or a file `name.safetensors`
in the current folder. The tags are removed from the prompt the text encoder sees.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ldm_cli.adapters.files import LoraFile, LoraSpec, read_lora_file
from ldm_cli.bundle import file_sha256
from ldm_cli.errors import DataError, UsageError

TAG = re.compile(r"<lora:(?P<name>[^:>]+)(?::(?P<scale>[^>]*))?>")


def strip_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`"a cat <lora:style:0.8>"` → ("a cat", [("style", 0.8)])."""
    tags = []
    for match in TAG.finditer(prompt):
        text = (match["scale"] or "1").strip()
        try:
            tags.append((match["name"].strip(), float(text)))
        except ValueError:
            raise UsageError(f"prompt tag {match[0]}: the scale must be a number") from None
    cleaned = " ".join(TAG.sub(" ", prompt).split()) if tags else prompt
    return cleaned, tags


def lora_specs(options: list[str], prompts: list[str]) -> tuple[list[str], list[LoraSpec]]:
    """(prompts without tags, every LoRA of the run); a LoRA tagged with two scales is an error."""
    specs = [LoraSpec.parse(option) for option in options]
    cleaned, tagged = [], {}
    for prompt in prompts:
        text, tags = strip_tags(prompt)
        cleaned.append(text)
        for name, scale in tags:
            if tagged.setdefault(name, scale) != scale:
                raise UsageError(f"<lora:{name}> is tagged with scales {tagged[name]:g} and {scale:g}; a run applies one scale per LoRA")
    for name, scale in tagged.items():
        index = next((i for i, spec in enumerate(specs) if spec.path.stem == name), None)
        if index is not None:
            specs[index] = LoraSpec(specs[index].path, scale)
            continue
        path = Path(name if name.endswith(".safetensors") else f"{name}.safetensors").expanduser()
        if not path.is_file():
            raise UsageError(f"the prompt tag <lora:{name}> names no --lora file and {path} is not here; pass --lora FILE")
        specs.append(LoraSpec(path, scale))
    return cleaned, specs


def read_loras(specs: list[LoraSpec]) -> list[tuple[LoraFile, float]]:
    return [(read_lora_file(spec.path), spec.scale) for spec in specs]


def lora_metadata(applied: list[tuple[LoraFile, float]]) -> list[dict[str, Any]]:
    """What an image records of its LoRAs: enough for `--replay` to check it uses the same files."""
    return [{"name": lora.name, "path": str(lora.path.resolve()), "sha256": lora.sha256, "scale": scale} for lora, scale in applied]


def replay_loras(recorded: list[dict[str, Any]], image: Path) -> list[tuple[LoraFile, float]]:
    """The recorded LoRA files, each checked by its hash (DataError when moved or changed)."""
    applied = []
    for entry in recorded:
        path = Path(entry["path"])
        if not path.is_file():
            raise DataError(f"the LoRA {entry['name']} of {image} is no longer at {path}; put it back there to replay")
        if file_sha256(path) != entry["sha256"]:
            raise DataError(f"{path} is not the LoRA {image} was made with (its sha256 differs)")
        applied.append((read_lora_file(path), float(entry["scale"])))
    return applied
