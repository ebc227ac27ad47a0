"""The U-Net's spatial transformer (diffusers' Transformer2DModel and BasicTransformerBlock): the
feature map's pixels as tokens, through self-attention, cross-attention to the text and a GEGLU MLP."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ldm_cli.checkpointing import run_checkpointed

# diffusers' Transformer2DModel hard-codes this GroupNorm eps (resnets use `norm_eps`).
TRANSFORMER_GROUP_NORM_EPS = 1e-6


class ScaledDotProductAttention(nn.Module):
    """softmax(q kᵀ / √d) v over [B, heads, L, d]: the attention kernel, a module of its own so that a
    backend can swap it by type (no parameters)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(query, key, value)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, L, heads·d] -> [B, heads, L, d]."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, heads, L, d] -> [B, L, heads·d]."""
    batch, _, length, _ = x.shape
    return x.transpose(1, 2).reshape(batch, length, -1)


class Attention(nn.Module):
    """Multi-head attention; keys/values come from `context` (cross) or from `x` itself (self)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.attend = ScaledDotProductAttention()
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])  # ".0" as in diffusers

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out[0](merge_heads(self.attend(q, k, v)))


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

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: run transformer blocks over the H*W pixels as tokens.

    proj_in/proj_out are 1x1 convolutions on the feature map (SD1) or linears on the tokens (SD2)."""

    def __init__(
        self, channels: int, heads: int, num_layers: int, context_dim: int, groups: int,
        use_linear_projection: bool, use_checkpoint: bool,
    ) -> None:
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.use_checkpoint = use_checkpoint
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, context_dim) for _ in range(num_layers)]
        )
        self.proj_out = nn.Linear(channels, channels) if use_linear_projection else nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # pixels as tokens
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = run_checkpointed(block, self.use_checkpoint, h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x
