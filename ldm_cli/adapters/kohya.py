"""Write LoRA layers in the kohya / AUTOMATIC1111 layout that A1111, ComfyUI, kohya sd-scripts and
diffusers' `load_lora_weights` all read.

    lora_unet_<module path, . → _>.lora_down.weight   [rank, in] (conv: [rank, in, kh, kw])
    lora_unet_<…>.lora_up.weight                      [out, rank] (conv: [out, rank, 1, 1])
    lora_unet_<…>.alpha                               scalar; the update is up @ down * alpha / rank
    lora_te_text_model_<…>                            the same for the CLIP text encoder
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm_cli.adapters.layers import LoraLayer, split_target
from ldm_cli.adapters.targets import KOHYA_PREFIXES
from ldm_cli.bundle import write_safetensors


def kohya_name(target: str) -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    part, path = split_target(target)
    return KOHYA_PREFIXES[part] + path.replace(".", "_")


def kohya_state_dict(layers: Mapping[str, LoraLayer], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for target, layer in layers.items():
        name = kohya_name(target)
        down, up = layer.down.detach(), layer.up.detach()
        if down.dim() == 4 and up.dim() == 2:  # a conv layer's up is a 1x1 conv in kohya files
            up = up[:, :, None, None]
        tensors[f"{name}.lora_down.weight"] = down.to(dtype) if dtype else down
        tensors[f"{name}.lora_up.weight"] = up.to(dtype) if dtype else up
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha))
    return tensors


def write_kohya_file(layers: Mapping[str, LoraLayer], path: Path, metadata: Mapping[str, str], dtype: torch.dtype | None = None) -> None:
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    write_safetensors(kohya_state_dict(layers, dtype), partial, metadata=dict(metadata))
    os.replace(partial, path)
