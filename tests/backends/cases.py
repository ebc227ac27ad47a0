"""Small U-Nets covering the layouts the backends must handle, and inputs for them."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm_cli.diffusion.unet import UNet
from ldm_cli.diffusion.unet_config import UNetConfig

PRESETS = Path(__file__).resolve().parents[2] / "ldm_cli" / "configs" / "unet"

CASES = {
    # SD1 in miniature: 1x1-conv projections, attention at the fine level
    "conv_proj": UNetConfig(
        sample_size=8, block_out_channels=[32, 64], cross_attention_dim=32, layers_per_block=1, attention_head_dim=8,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    ),
    # SD2-style linear projections, attention at the coarse level only (layers before the text: two levels)
    "linear_proj": UNetConfig(
        sample_size=8, block_out_channels=[32, 64], cross_attention_dim=32, layers_per_block=2, attention_head_dim=[2, 4],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8, use_linear_projection=True,
    ),
}


def tiny_preset() -> UNetConfig:
    """configs/unet/tiny.yaml, the quickstart's U-Net."""
    merged = OmegaConf.merge(OmegaConf.structured(UNetConfig), OmegaConf.load(PRESETS / "tiny.yaml"))
    return OmegaConf.to_object(merged)


def config_of(case: str) -> UNetConfig:
    return tiny_preset() if case == "tiny_preset" else CASES[case]


CASE_NAMES = [*CASES, "tiny_preset"]


def unet_and_inputs(case: str, rows: int = 2, text_rows: int | None = None, side: int = 8, seed: int = 0):
    """An eval-mode random U-Net, latents [rows, C, side, side], timesteps [rows], texts [text_rows, 5, D]."""
    config = config_of(case)
    torch.manual_seed(seed)
    unet = UNet(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    sample = torch.randn(rows, config.in_channels, side, side, generator=generator)
    text = torch.randn(text_rows or rows, 5, config.cross_attention_dim, generator=generator)
    return unet, sample, torch.tensor([10.0, 900.0, 500.0, 3.0])[:rows], text
