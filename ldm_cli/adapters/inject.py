"""Trainable LoRA adapters in a U-Net or a CLIP text encoder, by peft (the library diffusers uses):
inject, read out, load.

peft wraps each targeted layer so that y = W x + (alpha / rank) * B(A(dropout(x))), with W frozen and
only A, B trainable. SD1's proj_in/proj_out are 1x1 convolutions applied to tokens (TokenConv1x1), so
peft's conv LoRA does not fit them: they get peft's linear LoRA, whose A/B are the same matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.adapters.config import LoraConfig
from ldm_cli.adapters.layers import TEXT_ENCODER, UNET, LoraLayer
from ldm_cli.adapters.targets import CLIP_WRAPPER
from ldm_cli.backends.cpu import TokenConv1x1
from ldm_cli.training.optim import quiet_bitsandbytes

ADAPTER = "default"


def _token_conv_lora() -> type:
    quiet_bitsandbytes()  # peft imports it where installed
    from peft.tuners.lora.layer import Linear

    class TokenConvLora(Linear):
        """peft's linear LoRA around a TokenConv1x1 (tokens in, tokens out)."""

    return TokenConvLora


def inject_lora(unet: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze every base weight and add adapters to the targeted layers; returns their module names."""
    return _inject(unet, config, config.pattern, {TokenConv1x1: _token_conv_lora()})


def inject_text_lora(text_model: nn.Module, config: LoraConfig) -> list[str]:
    """The same for a CLIP text model (transformers'): q/k/v/out_proj, + fc1/fc2 beyond `attention`."""
    return _inject(text_model, config, config.text_pattern, {})


def _inject(model: nn.Module, config: LoraConfig, pattern: str, custom: dict[type, type]) -> list[str]:
    quiet_bitsandbytes()  # peft imports it where installed
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    peft_config = PeftConfig(
        r=config.rank, lora_alpha=config.effective_alpha, lora_dropout=config.dropout, target_modules=pattern,
    )
    if custom:
        peft_config._register_custom_module(custom)
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    return adapted_modules(model)


def target_prefix(part: str, model: nn.Module) -> str:
    """What turns a module name into a canonical target (`targets.py`): `unet.`, or `text_encoder.text_model.`
    for a CLIP text model whose transformers version drops the `text_model.` wrapper."""
    if part == UNET:
        return f"{UNET}."
    return f"{TEXT_ENCODER}." + ("" if hasattr(model, CLIP_WRAPPER.rstrip(".")) else CLIP_WRAPPER)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights under their own names (peft moves W to `<module>.base_layer.weight`)."""
    return {key.replace(".base_layer.", "."): value for key, value in model.state_dict().items() if ".lora_" not in key}


def adapted_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and ADAPTER in module.lora_A]


def lora_layers(
    model: nn.Module, alpha: float, values: dict[str, torch.Tensor] | None = None, part: str = UNET,
) -> dict[str, LoraLayer]:
    """The adapters as `{<canonical target>: LoraLayer}` (float32 copies); `values` (e.g. EMA) replaces
    the module's own parameters by state-dict name."""
    params = dict(model.named_parameters())
    values = values or {}
    prefix = target_prefix(part, model)
    layers = {}
    for name in adapted_modules(model):
        down_key, up_key = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
        down = values.get(down_key, params[down_key]).detach().float().cpu().clone()
        up = values.get(up_key, params[up_key]).detach().float().cpu().clone()
        if model.get_submodule(name).get_base_layer().weight.dim() == 4 and down.dim() == 2:  # TokenConv1x1
            down, up = down[:, :, None, None], up[:, :, None, None]
        layers[prefix + name] = LoraLayer(down, up, alpha)
    return layers


@torch.no_grad()
def load_lora_layers(model: nn.Module, layers: dict[str, LoraLayer], part: str = UNET) -> None:
    """Set the injected adapters from a LoRA (`lora.init_from`); every adapted layer must be in it."""
    from ldm_cli.errors import IncompatibleError

    params = dict(model.named_parameters())
    prefix = target_prefix(part, model)
    for name in adapted_modules(model):
        layer = layers.get(prefix + name)
        down, up = params[f"{name}.lora_A.{ADAPTER}.weight"], params[f"{name}.lora_B.{ADAPTER}.weight"]
        if layer is None or layer.down.numel() != down.numel() or layer.up.numel() != up.numel():
            raise IncompatibleError(f"lora.init_from has no layer of rank {down.shape[0]} for {prefix}{name}; match lora.rank, "
                                    "lora.targets and lora.train_text_encoder to the file")
        # the file's alpha may differ: fold alpha / rank into up so the update is the file's
        down.copy_(layer.down.reshape(down.shape))
        up.copy_(layer.up.reshape(up.shape) * (layer.alpha / layer.rank) / scaling(model, name))


def scaling(model: nn.Module, name: str) -> float:
    return float(model.get_submodule(name).scaling[ADAPTER])
