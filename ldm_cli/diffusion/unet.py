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
from functools import partial
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm_cli.attention import attention
from ldm_cli.diffusion.unet_config import UNetConfig

# diffusers' Transformer2DModel hard-codes this GroupNorm eps (resnets use `norm_eps`).
TRANSFORMER_GROUP_NORM_EPS = 1e-6
# aten's channels-last GroupNorm has no fast bf16 path for fewer than 16 channels per group on maps
# under 1024 pixels: 4-15x slower there than in NCHW (forward and backward).
SLOW_NHWC_NORM_MAX_PIXELS = 1023
SLOW_NHWC_NORM_MAX_GROUP_CHANNELS = 15


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


def _run(module: nn.Module, use_checkpoint: bool, *args: Any) -> Tensor:
    """Call `module`, recomputing it in backward instead of storing activations when asked."""
    if use_checkpoint and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def _widen(x: Tensor, batch: int) -> Tensor:
    """`x` ([B, ...]) as `batch` = n·B rows: n copies of the batch, in the order of the text rows
    [copy 0 of every sample, copy 1, ...]; unchanged when it already has `batch` rows."""
    if x.shape[0] == batch:
        return x
    return torch.cat([x] * (batch // x.shape[0]))  # cat keeps channels_last, where repeat would not


def _text_batch(context: Context) -> int:
    return (context.layers[0][0] if isinstance(context, TextKeysValues) else context).shape[0]


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that takes small bf16 channels-last maps through NCHW and back (two copies), where
    aten's NHWC kernel is slow (`SLOW_NHWC_NORM_*`). With it, channels_last costs bf16 nothing at small
    sizes, so a U-Net can use the layout its fp32 convolutions prefer: the `small` U-Net's bf16 sampling
    forward at 16x16 latents 2.5-5% faster; the `tiny` one trains in NHWC at bf16 as fast as in NCHW
    (scripts/bench_train_diffusion.py)."""

    def forward(self, x: Tensor) -> Tensor:
        slow_nhwc = (
            x.dtype == torch.bfloat16
            and x.shape[-2] * x.shape[-1] <= SLOW_NHWC_NORM_MAX_PIXELS
            and x.shape[1] // self.num_groups <= SLOW_NHWC_NORM_MAX_GROUP_CHANNELS
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )
        if slow_nhwc:
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


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
        h = h + (time_bias if time_bias.shape[0] == 1 else _widen(time_bias, h.shape[0]))  # one row broadcasts
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class TextKeysValues(NamedTuple):
    """Every cross-attention layer's keys and values for one text context (`UNet.project_text`).

    The text stays fixed while an image is sampled, so its projections need computing once, not at
    every step: 4-6% of a `small` U-Net forward at CPU sizes (scripts/bench_sample.py). `UNet.forward`
    takes this or the text embedding itself as `encoder_hidden_states`."""

    layers: tuple[tuple[Tensor, Tensor], ...]  # (keys, values) [B, heads, L, d] per cross-attention layer


Context = Union[Tensor, TextKeysValues]


class Attention(nn.Module):
    """Multi-head attention; keys/values come from `context` (cross) or from `x` itself (self)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.context_index = -1  # this layer's place in TextKeysValues.layers (set by UNet)
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])  # ".0" as in diffusers
        self.to_qkv: nn.Linear | None = None  # set by fuse_qkv

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self._split_heads(self.to_k(context)), self._split_heads(self.to_v(context))

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """For self-attention at inference: q, k and v from one matmul on the concatenated weights
        (diffusers' `fuse_qkv_projections`), one larger call instead of three. Replaces to_q/to_k/to_v,
        so the module no longer loads or saves their weights."""
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        self.to_qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        self.to_qkv.weight.copy_(weight)
        del self.to_q, self.to_k, self.to_v

    def forward(self, x: Tensor, context: Context | None = None) -> Tensor:
        if context is None and self.to_qkv is not None:
            q, k, v = (self._split_heads(t) for t in self.to_qkv(x).chunk(3, dim=-1))
            return self._attend(q, k, v)
        q = self._split_heads(self.to_q(x))
        if isinstance(context, TextKeysValues):
            k, v = context.layers[self.context_index]
        else:
            k, v = self.keys_values(x if context is None else context)
        return self._attend(q, k, v)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        batch, _, length, _ = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(batch, length, -1))


class GEGLU(nn.Module):
    """Linear to 2x width, then value * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # index 1 is diffusers' dropout slot, kept so that `ff.net.2` keeps its name
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and a GEGLU MLP, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Context) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class TokenConv1x1(nn.Conv2d):
    """SD1's 1x1-convolution proj_in/proj_out (conv-shaped weight [C, C, 1, 1], as in its checkpoints),
    applied to tokens [B, HW, C] as the matmul it is: that skips the conv kernel's overhead and a layout
    copy (measured: scripts/bench_train_diffusion.py)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, kernel_size=1)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: run transformer blocks over the H*W pixels as tokens."""

    def __init__(
        self, channels: int, heads: int, num_layers: int, context_dim: int, groups: int,
        use_linear_projection: bool, use_checkpoint: bool,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        projection = partial(nn.Linear, channels) if use_linear_projection else TokenConv1x1
        self.proj_in = projection(channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim) for _ in range(num_layers)]
        )
        self.proj_out = projection(channels)

    def forward(self, x: Tensor, context: Context) -> Tensor:
        x = _widen(x, _text_batch(context))  # where the text enters, every text row needs its own copy
        batch, channels, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view when channels_last
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = _run(block, self.use_checkpoint, h, context)
        h = self.proj_out(h)
        # back to [B, C, H, W] in the input's memory layout (free when channels_last)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return h.contiguous(memory_format=_memory_format(x)) + x


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
            x = _run(resnet, self.use_checkpoint, x, temb)
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
        x = _run(self.resnets[0], self.use_checkpoint, x, temb)
        for transformer, resnet in zip(self.attentions, self.resnets[1:]):
            x = _run(resnet, self.use_checkpoint, transformer(x, context), temb)
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
            x = _run(resnet, self.use_checkpoint, torch.cat([x, _widen(skip, x.shape[0])], dim=1), temb)
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
        text_batch = _text_batch(encoder_hidden_states)
        if text_batch % sample.shape[0]:
            raise ValueError(f"the text's batch ({text_batch}) must be a multiple of the sample's ({sample.shape[0]})")
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
