"""Which layers of a model a LoRA file's layer names mean, and whether each one fits.

A model is described by its weight shapes per part (`unet`, `text_encoder`), keyed by state-dict names.
Targets are canonical: `unet.<module>` and `text_encoder.text_model.<module>` (CLIP's names as
diffusers and kohya spell them, whether or not the installed transformers keeps the `text_model.`
wrapper). kohya names are the module path with `.` → `_`, which cannot be split back without the
model: they are looked up among the model's own modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ldm_cli.adapters.files import KOHYA, LoraFile
from ldm_cli.adapters.layers import TEXT_ENCODER, UNET, LoraLayer
from ldm_cli.errors import IncompatibleError

KOHYA_PREFIXES = {UNET: "lora_unet_", TEXT_ENCODER: "lora_te_"}
CLIP_WRAPPER = "text_model."


@dataclass(frozen=True)
class Target:
    part: str  # UNET or TEXT_ENCODER
    key: str  # the weight's state-dict key in that part's model
    shape: torch.Size


class ModelTargets:
    """Every weight a LoRA may change: canonical target → (part, state-dict key, shape)."""

    def __init__(self, shapes: Mapping[str, Mapping[str, torch.Size]]) -> None:
        self.targets: dict[str, Target] = {}
        for part, part_shapes in shapes.items():
            wrapped = part == TEXT_ENCODER and not any(key.startswith(CLIP_WRAPPER) for key in part_shapes)
            for key, shape in part_shapes.items():
                if not key.endswith(".weight") or len(shape) not in (2, 4):
                    continue
                module = key[: -len(".weight")]
                canonical = CLIP_WRAPPER + module if wrapped else module
                self.targets[f"{part}.{canonical}"] = Target(part, key, torch.Size(shape))
        # files saved with a transformers that drops CLIP's wrapper name its layers without it
        self.aliases = {
            f"{TEXT_ENCODER}.{target[len(TEXT_ENCODER) + 1 + len(CLIP_WRAPPER):]}": target
            for target in self.targets if target.startswith(f"{TEXT_ENCODER}.{CLIP_WRAPPER}")
        }
        self.kohya = {
            KOHYA_PREFIXES[name.split(".", 1)[0]] + name.split(".", 1)[1].replace(".", "_"): target
            for name, target in [*self.aliases.items(), *((t, t) for t in self.targets)]
        }

    @classmethod
    def of(cls, unet_weights: Mapping[str, torch.Tensor], text_encoder: torch.nn.Module | None) -> "ModelTargets":
        shapes = {UNET: {key: value.shape for key, value in unet_weights.items()}}
        if text_encoder is not None:
            shapes[TEXT_ENCODER] = {key: value.shape for key, value in text_encoder.state_dict().items()}
        return cls(shapes)

    def resolve(self, lora: LoraFile) -> dict[str, LoraLayer]:
        """{canonical target: layer}; IncompatibleError naming the first layer that matches no weight
        or whose shape differs (a LoRA made for another architecture)."""
        resolved: dict[str, LoraLayer] = {}
        for name, layer in lora.layers.items():
            target = self.kohya.get(name) if lora.layout == KOHYA else self.aliases.get(name, name)
            if target is None or target not in self.targets:
                raise IncompatibleError(f"LoRA {lora.path} does not fit this model: its layer {name} matches no weight of it (a LoRA for another architecture?)")
            shape = self.targets[target].shape
            if not layer.fits(shape):
                raise IncompatibleError(
                    f"LoRA {lora.path} does not fit this model: layer {name} is {tuple(layer.up.shape)} x "
                    f"{tuple(layer.down.shape)}, the weight it changes is {tuple(shape)} (a LoRA for another architecture?)"
                )
            resolved[target] = layer
        return resolved
