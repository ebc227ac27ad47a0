"""Trainable LoRA adapters in a U-Net, by peft (the library diffusers uses): inject, read out, load.

peft wraps each targeted layer so that y = W x + (alpha / rank) * B(A(dropout(x))), with W frozen and
only A, B trainable. SD1's proj_in/proj_out are 1x1 convolutions applied to tokens (TokenConv1x1), so
peft's conv LoRA does not fit them: they get peft's linear LoRA, whose A/B are the same matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.adapters.config import LoraConfig
from ldm_cli.adapters.layers import UNET, LoraLayer
from ldm_cli.backends.cpu import TokenConv1x1

ADAPTER = "default"


def _token_conv_lora() -> type:
    from peft.tuners.lora.layer import Linear

    class TokenConvLora(Linear):
        """peft's linear LoRA around a TokenConv1x1 (tokens in, tokens out)."""

    return TokenConvLora


def inject_lora(unet: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze every base weight and add adapters to the targeted layers; returns their module names."""
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model

    unet.requires_grad_(False)
    peft_config = PeftConfig(
        r=config.rank, lora_alpha=config.effective_alpha, lora_dropout=config.dropout, target_modules=config.pattern,
    )
    peft_config._register_custom_module({TokenConv1x1: _token_conv_lora()})
    inject_adapter_in_model(peft_config, unet, adapter_name=ADAPTER)
    return adapted_modules(unet)


def base_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen weights under their own names (peft moves W to `<module>.base_layer.weight`)."""
    return {key.replace(".base_layer.", "."): value for key, value in unet.state_dict().items() if ".lora_" not in key}


def adapted_modules(unet: nn.Module) -> list[str]:
    return [name for name, module in unet.named_modules() if hasattr(module, "lora_A") and ADAPTER in module.lora_A]


def lora_layers(unet: nn.Module, alpha: float, values: dict[str, torch.Tensor] | None = None) -> dict[str, LoraLayer]:
    """The adapters as `{unet.<module>: LoraLayer}` (float32 copies); `values` (e.g. EMA) replaces the
    module's own parameters by state-dict name."""
    params = dict(unet.named_parameters())
    values = values or {}
    layers = {}
    for name in adapted_modules(unet):
        down_key, up_key = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
        down = values.get(down_key, params[down_key]).detach().float().cpu().clone()
        up = values.get(up_key, params[up_key]).detach().float().cpu().clone()
        if unet.get_submodule(name).get_base_layer().weight.dim() == 4 and down.dim() == 2:  # TokenConv1x1
            down, up = down[:, :, None, None], up[:, :, None, None]
        layers[f"{UNET}.{name}"] = LoraLayer(down, up, alpha)
    return layers


@torch.no_grad()
def load_lora_layers(unet: nn.Module, layers: dict[str, LoraLayer]) -> None:
    """Set the injected adapters from a LoRA (`lora.init_from`); every adapted layer must be in it."""
    from ldm_cli.errors import IncompatibleError

    params = dict(unet.named_parameters())
    for name in adapted_modules(unet):
        layer = layers.get(f"{UNET}.{name}")
        down, up = params[f"{name}.lora_A.{ADAPTER}.weight"], params[f"{name}.lora_B.{ADAPTER}.weight"]
        if layer is None or layer.down.numel() != down.numel() or layer.up.numel() != up.numel():
            raise IncompatibleError(f"lora.init_from has no layer of rank {down.shape[0]} for {name}; match lora.rank and lora.targets to the file")
        # the file's alpha may differ: fold alpha / rank into up so the update is the file's
        down.copy_(layer.down.reshape(down.shape))
        up.copy_(layer.up.reshape(up.shape) * (layer.alpha / layer.rank) / (unet_scaling(unet, name)))


def unet_scaling(unet: nn.Module, name: str) -> float:
    return float(unet.get_submodule(name).scaling[ADAPTER])
