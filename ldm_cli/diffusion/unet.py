"""Stable Diffusion v1's text-conditioned U-Net, written from scratch.

Parameter names equal diffusers' `UNet2DConditionModel` state_dict keys, so its weights load
with a strict `load_state_dict` both ways. The network predicts the noise (or v) of a latent
`sample` at diffusion `timestep`, conditioned on text tokens `encoder_hidden_states`:

    conv_in -> down blocks (resnets [+ spatial transformers], downsample) -> mid block
            -> up blocks (concat skip, resnets [+ spatial transformers], upsample) -> conv_out

The text may hold n times as many rows as the sample (classifier-free guidance: one latent, the
[uncond, cond] texts). The batch then widens where the text first enters, at the first spatial
transformer: the layers before it see the same input for all n texts and run once, not n times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_cli.diffusion.layers import GroupNorm, run_checkpointed, widen
from ldm_cli.diffusion.transformer import Attention, Context, SpatialTransformer, TextKeysValues, TransformerBlock, text_batch
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


class TimeProjections(NamedTuple):
    """Every resnet's projection of the time embedding for one timestep (`UNet.project_time`).

    A sampling run visits a fixed list of timesteps, so these can be computed for all its steps together,
    reading each resnet's projection matrix once per run instead of at every step: 3.5-5% of a `small`
    U-Net forward at CPU sizes (scripts/bench_sample.py). `UNet.forward` takes this or the timestep."""

    layers: tuple[Tensor, ...]  # [1 or B, C, 1, 1] per resnet, in the order of UNet._resnets()


Time = Union[Tensor, float, int, TimeProjections]


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between, plus a skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.time_index = -1  # this block's place in TimeProjections.layers (set by UNet)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv only where the width changes, as diffusers (no params otherwise)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def project_time(self, temb: Tensor) -> Tensor:
        """The time embedding [B, temb_channels] as a per-channel bias [B, C, 1, 1] of the first conv's output."""
        return self.time_emb_proj(F.silu(temb))[:, :, None, None]

    def forward(self, x: Tensor, temb: Tensor | TimeProjections) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        time_bias = temb.layers[self.time_index] if isinstance(temb, TimeProjections) else self.project_time(temb)
        h = h + (time_bias if time_bias.shape[0] == 1 else widen(time_bias, h.shape[0]))  # one row broadcasts
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

    def forward(self, x: Tensor, temb: Tensor | TimeProjections, context: Context) -> tuple[Tensor, list[Tensor]]:
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

    def forward(self, x: Tensor, temb: Tensor | TimeProjections, context: Context) -> Tensor:
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
        self, x: Tensor, skips: list[Tensor], temb: Tensor | TimeProjections, context: Context,
        upsample_size: tuple[int, int] | None,
    ) -> Tensor:
        """`skips` in the order they are consumed (most recent first)."""
        for j, (resnet, skip) in enumerate(zip(self.resnets, skips, strict=True)):
            x = run_checkpointed(resnet, self.use_checkpoint, torch.cat([x, widen(skip, x.shape[0])], dim=1), temb)
            if self.attentions:
                x = self.attentions[j](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_size)
        return x


class UNet(nn.Module):
    """eps/v-prediction U-Net: forward(sample [B,C,H,W], timestep, encoder_hidden_states [n·B,L,D] or the
    `project_text` of it) -> [n·B,C,H,W]; n = 1 in training, 2 for classifier-free guidance."""

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

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)
        for index, layer in enumerate(self._cross_attentions()):
            layer.context_index = index
        for index, resnet in enumerate(self._resnets()):
            resnet.time_index = index

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _cross_attentions(self) -> list[Attention]:
        return [module.attn2 for module in self.modules() if isinstance(module, TransformerBlock)]

    def _resnets(self) -> list[ResnetBlock]:
        return [module for module in self.modules() if isinstance(module, ResnetBlock)]

    def _time_embedding(self, timestep: Tensor | float | int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        timesteps = torch.as_tensor(timestep, device=device)
        timesteps = timesteps.reshape(-1).expand(batch)  # a scalar applies to the whole batch
        time_features = timestep_embedding(
            timesteps, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
        )
        return self.time_embedding(time_features.to(dtype))

    def project_time(self, timestep: Tensor | float | int, dtype: torch.dtype) -> TimeProjections:
        """Every resnet's time bias for the timesteps [B] (or one scalar), to pass as `timestep` to forwards
        of samples of dtype `dtype` at those timesteps; the outputs are the same as with the timestep."""
        batch = torch.as_tensor(timestep).numel()
        temb = self._time_embedding(timestep, batch, dtype, self.conv_in.bias.device)
        return TimeProjections(tuple(resnet.project_time(temb) for resnet in self._resnets()))

    def project_text(self, encoder_hidden_states: Tensor) -> TextKeysValues:
        """The text's keys and values for every cross-attention layer, to pass as `encoder_hidden_states`
        to many forwards with the same text (sampling); the outputs are the same as with the text itself."""
        return TextKeysValues(tuple(layer.keys_values(encoder_hidden_states) for layer in self._cross_attentions()))

    def forward(self, sample: Tensor, timestep: Time, encoder_hidden_states: Context) -> Tensor:
        text_rows = text_batch(encoder_hidden_states)
        if text_rows % sample.shape[0]:
            raise ValueError(f"the text's batch ({text_rows}) must be a multiple of the sample's ({sample.shape[0]})")
        if isinstance(timestep, TimeProjections):
            if timestep.layers[0].shape[0] not in (1, sample.shape[0]):
                raise ValueError(f"time projections of {timestep.layers[0].shape[0]} timesteps for {sample.shape[0]} samples")
            temb: Tensor | TimeProjections = timestep
        else:
            temb = self._time_embedding(timestep, sample.shape[0], sample.dtype, sample.device)

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
