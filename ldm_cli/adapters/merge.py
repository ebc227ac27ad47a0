"""Bake LoRAs into a model's weights: W += scale * alpha / rank * up @ down, once, at load.

Merged weights cost nothing per sampling step (the U-Net runs exactly as without a LoRA), and since
sampling loads the model per run nothing is ever unmerged. Every file is checked against the model
before the first weight changes, so a LoRA that does not fit leaves the model untouched.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch

from ldm_cli.adapters.files import LoraFile
from ldm_cli.adapters.layers import TEXT_ENCODER, UNET
from ldm_cli.adapters.targets import ModelTargets

Applied = Sequence[tuple[LoraFile, float]]  # each file with its scale


@torch.no_grad()
def merge_loras(unet_weights: MutableMapping[str, torch.Tensor], text_encoder: torch.nn.Module | None, loras: Applied) -> None:
    """Add every LoRA (several add up) to the U-Net state dict (in place, before the U-Net is built)
    and to the text encoder's parameters. Deltas are summed in float32, then cast once per weight."""
    if not loras:
        return
    targets = ModelTargets.of(unet_weights, text_encoder)
    resolved = [(targets.resolve(lora), scale) for lora, scale in loras]  # all checked before any change
    if text_encoder is None and any(t.startswith(TEXT_ENCODER + ".") for layers, _ in resolved for t in layers):
        raise ValueError("a LoRA with text-encoder layers needs the text encoder")
    deltas: dict[str, torch.Tensor] = {}
    for layers, scale in resolved:
        for name, layer in layers.items():
            target = targets.targets[name]
            change = layer.delta(target.shape, scale)
            deltas[name] = deltas[name] + change if name in deltas else change
    text_state = text_encoder.state_dict() if text_encoder is not None else {}
    for name, change in deltas.items():
        target = targets.targets[name]
        if target.part == UNET:
            weight = unet_weights[target.key]
            unet_weights[target.key] = (weight.float() + change.to(weight.device)).to(weight.dtype)
        else:
            weight = text_state[target.key]  # shares storage with the parameter
            weight.copy_(weight.float() + change.to(weight.device))

