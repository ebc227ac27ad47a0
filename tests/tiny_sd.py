"""The parts of a tiny random Stable Diffusion pipeline, built by diffusers and transformers themselves.

    pipeline = StableDiffusionPipeline(**tiny_sd_parts(), scheduler=DDIMScheduler(...))
    pipeline.save_pretrained(root, safe_serialization=True)

U-Net (32, 64) with cross-attention width 32, VAE (8, 16) at 16 px, a 2-layer CLIP text encoder of
width 32 over a byte-level tokenizer; every weight is moved off diffusers' init (some layers start at zero).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_cli.diffusion.text import _byte_level_clip_tokenizer


def perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Distinct non-trivial values everywhere, near the init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def tiny_sd_parts(in_channels: int = 4, scale: float = 0.05) -> dict[str, Any]:
    """The keyword arguments of a diffusers SD pipeline but its scheduler; the U-Net reads `in_channels`."""
    tokenizer = _byte_level_clip_tokenizer(77)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8, attention_head_dim=4,
        in_channels=in_channels, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    for seed, model in enumerate((unet, vae, text_encoder)):
        perturb(model, seed, scale)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
