"""Stable Diffusion's KL autoencoder (kl-f8), written from scratch.

Module and parameter names follow diffusers' `AutoencoderKL` state_dict exactly, so a
diffusers VAE checkpoint loads with a strict `load_state_dict`:

    image --Encoder--> moments --quant_conv--> (mean, logvar)   posterior q(z|x)
    z --post_quant_conv--> --Decoder--> image
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm_cli.attention import attention
from ldm_cli.checkpointing import run_checkpointed

NORM_EPS = 1e-6  # every GroupNorm in the SD autoencoder uses this eps


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    gradient_checkpointing: bool = False
    # initial posterior log-variance (SD: 0). A fresh encoder's means are small, so unit-variance
    # samples drown them; a short run learns much faster when the noise starts small.
    posterior_logvar_init: float = 0.0

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for kl-f8)."""
        return downsampling_factor(self)


def downsampling_factor(config: AutoencoderConfig) -> int:
    # every block but the last halves the resolution
    return 2 ** (len(config.block_out_channels) - 1)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))), from the encoder's 2*latent moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        # same clamp as SD: keeps exp() finite for untrained or diverging encoders
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # draw on the generator's device (a CPU generator gives the same noise on any device)
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over each sample's latent elements: shape [B], float32."""
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + var - 1.0 - logvar, dim=[1, 2, 3])


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1-projected when widths differ) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions (the VAE's mid-block attention)."""

    def __init__(self, channels: int, norm_num_groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_num_groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # one head: [B, 1, HW, C]; the scale 1/sqrt(C) is the original one
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        attended = attention(q, k, v).squeeze(1)
        out = self.to_out[0](attended).transpose(1, 2).reshape(batch, channels, height, width)
        return x + out


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric pad (right/bottom only), as in the original LDM code
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_num_groups)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, norm_num_groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, norm_num_groups) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(channels, norm_num_groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.gradient_checkpointing = config.gradient_checkpointing
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, downsample=i < len(widths) - 1
            )
            for i in range(len(widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        # mean and logvar for each latent channel
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in (*self.down_blocks, self.mid_block):
            h = run_checkpointed(block, self.gradient_checkpointing, h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = list(reversed(config.block_out_channels)), config.norm_num_groups
        self.gradient_checkpointing = config.gradient_checkpointing
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        # the decoder gets one resnet more per block than the encoder (as in LDM / diffusers)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, upsample=i < len(widths) - 1
            )
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in (self.mid_block, *self.up_blocks):
            h = run_checkpointed(block, self.gradient_checkpointing, h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        if config.posterior_logvar_init:
            with torch.no_grad():
                self.quant_conv.bias[config.latent_channels :] = config.posterior_logvar_init
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return downsampling_factor(self.config)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where the GAN loss's adaptive weight is measured."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


def _blend_ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, device: torch.device) -> torch.Tensor:
    """1-D tile weights: rise linearly over `overlap` at shared edges, flat 1 at image borders."""
    position = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones(length, device=device)
    if ramp_start:
        weight = torch.minimum(weight, position / overlap)
    if ramp_end:
        weight = torch.minimum(weight, (length - position) / overlap)
    return weight


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]  # last tile flush with the border, so every tile is full size


@torch.no_grad()
def tiled_decode(model: AutoencoderKL, z: torch.Tensor, tile_latent: int = 64, overlap: int = 16) -> torch.Tensor:
    """Decode a large latent tile by tile, blending overlaps linearly, so memory stays bounded.

    Tiles are `tile_latent` latent cells wide and share `overlap` cells with their neighbours;
    a latent no bigger than one tile is decoded in one call (identical to `model.decode`).
    """
    if not 0 <= overlap < tile_latent:
        raise ValueError(f"overlap ({overlap}) must be in [0, tile_latent={tile_latent})")
    height, width = z.shape[-2:]
    if height <= tile_latent and width <= tile_latent:
        return model.decode(z)
    factor = model.downsampling_factor
    stride = tile_latent - overlap
    overlap_px = max(overlap * factor, 1)
    output = None
    weight_sum = torch.zeros(height * factor, width * factor, device=z.device)
    rows, cols = _tile_starts(height, tile_latent, stride), _tile_starts(width, tile_latent, stride)
    for top in rows:
        for left in cols:
            tile = model.decode(z[..., top : top + tile_latent, left : left + tile_latent]).float()
            if output is None:
                output = torch.zeros(*tile.shape[:2], height * factor, width * factor, device=z.device)
            tile_h, tile_w = tile.shape[-2:]
            weight_y = _blend_ramp(tile_h, overlap_px, top > 0, top + tile_latent < height, z.device)
            weight_x = _blend_ramp(tile_w, overlap_px, left > 0, left + tile_latent < width, z.device)
            weight = weight_y[:, None] * weight_x[None, :]
            y0, x0 = top * factor, left * factor
            output[..., y0 : y0 + tile_h, x0 : x0 + tile_w] += tile * weight
            weight_sum[y0 : y0 + tile_h, x0 : x0 + tile_w] += weight
    return (output / weight_sum).to(z.dtype)
