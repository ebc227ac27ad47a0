"""The U-Net's spatial transformer (diffusers' Transformer2DModel and BasicTransformerBlock): the
feature map's pixels as tokens, through self-attention, cross-attention to the text and a GEGLU MLP."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_cli.attention import attention
from ldm_cli.diffusion.layers import GroupNorm, memory_format_of, run_checkpointed, widen

# diffusers' Transformer2DModel hard-codes this GroupNorm eps (resnets use `norm_eps`).
TRANSFORMER_GROUP_NORM_EPS = 1e-6


class TextKeysValues(NamedTuple):
    """Every cross-attention layer's keys and values for one text context (`UNet.project_text`).

    The text stays fixed while an image is sampled, so its projections need computing once, not at
    every step: 4-6% of a `small` U-Net forward at CPU sizes (scripts/bench_sample.py). `UNet.forward`
    takes this or the text embedding itself as `encoder_hidden_states`."""

    layers: tuple[tuple[Tensor, Tensor], ...]  # (keys, values) [B, heads, L, d] per cross-attention layer


Context = Union[Tensor, TextKeysValues]


def text_batch(context: Context) -> int:
    """How many rows the text has: the batch the U-Net runs at from the first spatial transformer on."""
    return (context.layers[0][0] if isinstance(context, TextKeysValues) else context).shape[0]


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
        x = widen(x, text_batch(context))  # where the text enters, every text row needs its own copy
        batch, channels, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view when channels_last
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = run_checkpointed(block, self.use_checkpoint, h, context)
        h = self.proj_out(h)
        # back to [B, C, H, W] in the input's memory layout (free when channels_last)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return h.contiguous(memory_format=memory_format_of(x)) + x
