"""The kohya-style `ss_*` metadata of a LoRA file (what A1111's and ComfyUI's LoRA browsers show)."""

from __future__ import annotations

import json
from typing import Any

from ldm_cli import __version__
from ldm_cli.adapters.config import LoraConfig


def kohya_metadata(
    config: LoraConfig, base: Any, steps: int, resolution: int, dataset_size: int, name: str, lr: float,
) -> dict[str, str]:
    """`base` is the base model's Bundle, `lr` the U-Net adapters' (train.lr); every value is a string, as
    safetensors metadata must be. A U-Net-only LoRA records a text-encoder learning rate of 0."""
    conv = config.targets == "all"
    text_lr = (config.text_encoder_lr if config.text_encoder_lr is not None else lr) if config.train_text_encoder else 0.0
    fields = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.rank,
        "ss_network_alpha": config.effective_alpha,
        "ss_network_args": json.dumps({"conv_dim": str(config.rank), "conv_alpha": str(config.effective_alpha)} if conv else {}),
        "ss_network_dropout": config.dropout,
        "ss_learning_rate": lr,
        "ss_unet_lr": lr,
        "ss_text_encoder_lr": text_lr,
        "ss_sd_model_name": base.path.name,
        "ss_sd_model_hash": base.content_hash[:8],
        "ss_new_sd_model_hash": base.content_hash,
        "ss_base_model_version": "sd_v1",
        "ss_v2": str(bool(base.meta.get("schedule", {}).get("prediction_type") == "v_prediction")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_num_train_images": dataset_size,
        "ss_output_name": name,
        "ldm_version": __version__,
        "ldm_targets": config.targets,
        "ldm_train_text_encoder": config.train_text_encoder,
    }
    return {key: str(value) for key, value in fields.items()}
