"""Stable Diffusion v1's text-conditioned U-Net, written from scratch.

Parameter names equal diffusers' `UNet2DConditionModel` state_dict keys, so its weights load
with a strict `load_state_dict` both ways. The network predicts the noise (or v) of a latent
`sample` at diffusion `timestep`, conditioned on text tokens `encoder_hidden_states`:

    conv_in -> down blocks (resnets [+ spatial transformers], downsample) -> mid block
            -> up blocks (concat skip, resnets [+ spatial transformers], upsample) -> conv_out

This file is the architecture only. Speed for sampling (text keys/values and time projections
computed once per run, guidance halves sharing the layers before the text) and CPU kernels live in
`ldm_cli/backends/`, which swap modules of this model by type without changing its parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_cli.checkpointing import run_checkpointed
from ldm_cli.diffusion.transformer import SpatialTransformer
from ldm_cli.diffusion.unet_config import UNetConfig


def timestep_embedding(
    timesteps: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal features of (possibly fractional) timesteps [B] -> [B, dim], as in DDPM/diffusers."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]
    if flip_sin_to_cos:
        embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    else:
        embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv only where the width changes, as diffusers (no params otherwise)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # the time embedding as a per-channel bias
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # nearest x2, or to the skip's exact size when an odd side was rounded up on the way down
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@dataclass
class _BlockSpec:
    """What every block of one U-Net shares."""

    temb_channels: int
    groups: int
    eps: float
    context_dim: int
    use_linear_projection: bool
    use_checkpoint: bool

    def resnet(self, in_channels: int, out_channels: int) -> ResnetBlock:
        return ResnetBlock(in_channels, out_channels, self.temb_channels, self.groups, self.eps)

    def transformer(self, channels: int, heads: int, num_layers: int) -> SpatialTransformer:
        return SpatialTransformer(
            channels, heads, num_layers, self.context_dim, self.groups,
            self.use_linear_projection, self.use_checkpoint,
        )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without)."""

    def __init__(
        self, spec: _BlockSpec, in_channels: int, out_channels: int, num_layers: int,
        cross_attention: bool, heads: int, transformer_layers: int, downsample: bool,
    ) -> None:
        super().__init__()
        self.use_checkpoint = spec.use_checkpoint
        # registration order (attentions first) reproduces diffusers' state_dict order
        self.attentions = nn.ModuleList(
            [spec.transformer(out_channels, heads, transformer_layers) for _ in range(num_layers)]
            if cross_attention else []
        )
        self.resnets = nn.ModuleList(
            [spec.resnet(in_channels if j == 0 else out_channels, out_channels) for j in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Returns the output and every intermediate the up path will concatenate back."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = run_checkpointed(resnet, self.use_checkpoint, x, temb)
            if self.attentions:
                x = self.attentions[j](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, spec: _BlockSpec, channels: int, heads: int, transformer_layers: int) -> None:
        super().__init__()
        self.use_checkpoint = spec.use_checkpoint
        self.attentions = nn.ModuleList([spec.transformer(channels, heads, transformer_layers)])
        self.resnets = nn.ModuleList([spec.resnet(channels, channels) for _ in range(2)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = run_checkpointed(self.resnets[0], self.use_checkpoint, x, temb)
        for transformer, resnet in zip(self.attentions, self.resnets[1:]):
            x = run_checkpointed(resnet, self.use_checkpoint, transformer(x, context), temb)
        return x


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: each resnet first concatenates one skip from the down path."""

    def __init__(
        self, spec: _BlockSpec, prev_channels: int, out_channels: int, skip_in_channels: int, num_layers: int,
        cross_attention: bool, heads: int, transformer_layers: int, upsample: bool,
    ) -> None:
        super().__init__()
        self.use_checkpoint = spec.use_checkpoint
        self.attentions = nn.ModuleList(
            [spec.transformer(out_channels, heads, transformer_layers) for _ in range(num_layers)]
            if cross_attention else []
        )
        resnets = []
        for j in range(num_layers):
            # the last skip of a level comes from the level above (its downsampler or conv_in)
            skip_channels = skip_in_channels if j == num_layers - 1 else out_channels
            resnets.append(spec.resnet((prev_channels if j == 0 else out_channels) + skip_channels, out_channels))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(
        self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
        upsample_size: tuple[int, int] | None,
    ) -> Tensor:
        """`skips` in the order they are consumed (most recent first)."""
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips, strict=True)):
            x = run_checkpointed(resnet, self.use_checkpoint, torch.cat([x, skip], dim=1), temb)
            if self.attentions:
                x = self.attentions[j](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_size)
        return x


class UNet(nn.Module):
    """eps/v-prediction U-Net: forward(sample [B,C,H,W], timestep [B] or a scalar, encoder_hidden_states
    [B,L,D]) -> [B,C,H,W]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        channels = config.block_out_channels
        layers, transformer_layers, heads = config.layers(), config.transformer_layers(), config.heads()
        time_embed_dim = channels[0] * 4
        spec = _BlockSpec(
            temb_channels=time_embed_dim, groups=config.norm_num_groups, eps=config.norm_eps,
            context_dim=config.cross_attention_dim, use_linear_projection=config.use_linear_projection,
            use_checkpoint=config.gradient_checkpointing,
        )
        last = len(channels) - 1

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim)

        # registered before mid_block, as diffusers does, so state_dict orders match
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            self.down_blocks.append(DownBlock(
                spec, channels[max(i - 1, 0)], channels[i], layers[i],
                cross_attention=block_type == "CrossAttnDownBlock2D", heads=heads[i],
                transformer_layers=transformer_layers[i], downsample=i < last,
            ))

        self.mid_block = MidBlock(spec, channels[-1], heads[-1], transformer_layers[-1])

        # up block i mirrors down block (last - i)
        for i, block_type in enumerate(config.up_block_types):
            level = last - i
            self.up_blocks.append(UpBlock(
                spec, prev_channels=channels[min(level + 1, last)], out_channels=channels[level],
                skip_in_channels=channels[max(level - 1, 0)], num_layers=layers[level] + 1,
                cross_attention=block_type == "CrossAttnUpBlock2D", heads=heads[level],
                transformer_layers=transformer_layers[level], upsample=i < last,
            ))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def time_embedding_of(self, timestep: Tensor | float | int, batch: int, dtype: torch.dtype) -> Tensor:
        """The time embedding [batch, 4·C0] of the timesteps [batch] (a scalar applies to the whole batch)."""
        device = self.conv_in.weight.device
        timesteps = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        time_features = timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
        )
        return self.time_embedding(time_features.to(dtype))

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor) -> Tensor:
        temb = self.time_embedding_of(timestep, sample.shape[0], sample.dtype)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states)
            skips.extend(block_skips)

        x = self.mid_block(x, temb, encoder_hidden_states)

        for block in self.up_blocks:
            block_skips = [skips.pop() for _ in block.resnets]
            upsample_size = skips[-1].shape[-2:] if skips else None  # the next level's resolution
            x = block(x, block_skips, temb, encoder_hidden_states, upsample_size)

        return self.conv_out(F.silu(self.conv_norm_out(x)))
