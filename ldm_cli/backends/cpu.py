"""CPU speed for the U-Net: each optimisation a module swapped in by type, with one sentence of why.

`optimize_for_cpu(unet)` keeps every parameter and state-dict key, so training can use it:
- `NchwBf16GroupNorm`: aten's channels-last GroupNorm has no fast bf16 path for fewer than 16 channels
  per group on maps under 1,024 pixels; there the map goes through NCHW and back (two copies).
- `RoutedAttention`: on the CPU in bf16/fp16, small score matrices are faster as two plain matmuls than
  through the fused kernel (`ldm_cli.attention`).
- `TokenSpatialTransformer` with `TokenConv1x1`: SD1's 1x1-convolution projections applied to the tokens
  as the matmul they are, which skips the convolution kernel's overhead and a layout copy.

`optimize_for_cpu_inference(unet)` adds, for frozen weights (sampling), where the CPU supports the dtype:
- `FusedSelfAttention`: each self-attention's q, k and v from one matmul (diffusers' `fuse_qkv_projections`).
- `PackedConv2d` / `PackedLinear`: weights reordered once into oneDNN's blocked layout, instead of at
  every eager call (the ops inductor's freezing emits for `compile=true`, without compiling).
The model is inference-only afterwards: the packed weights are opaque oneDNN tensors, and q/k/v are one.

`optimize_autoencoder_for_cpu(autoencoder)`: its convolutions in channels_last, oneDNN's native layout.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_cli.attention import attention
from ldm_cli.backends.modules import replace_modules, retype
from ldm_cli.checkpointing import run_checkpointed
from ldm_cli.diffusion.transformer import (
    Attention, ScaledDotProductAttention, SpatialTransformer, TransformerBlock, merge_heads, split_heads,
)

# aten's NHWC GroupNorm is slow in bf16 below these sizes (4-15x slower than NCHW, forward and backward)
SLOW_NHWC_NORM_MAX_PIXELS = 1023
SLOW_NHWC_NORM_MAX_GROUP_CHANNELS = 15


def memory_format_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class NchwBf16GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that takes small bf16 channels-last CPU maps through NCHW, where aten's kernel is slow."""

    def forward(self, x: Tensor) -> Tensor:
        slow_nhwc = (
            x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.shape[-2] * x.shape[-1] <= SLOW_NHWC_NORM_MAX_PIXELS
            and x.shape[1] // self.num_groups <= SLOW_NHWC_NORM_MAX_GROUP_CHANNELS
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )
        if slow_nhwc:
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class RoutedAttention(ScaledDotProductAttention):
    """The attention kernel chosen per shape and dtype (`ldm_cli.attention.attention`)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return attention(query, key, value)


class TokenConv1x1(nn.Conv2d):
    """A 1x1 convolution (weight [C, C, 1, 1], as in SD1 checkpoints) applied to tokens [B, HW, C]."""

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class TokenSpatialTransformer(SpatialTransformer):
    """The spatial transformer with its projections on the tokens for both SD1 (1x1 conv) and SD2 (linear),
    and its output in the input's memory layout (free when channels_last)."""

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view when channels_last
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = run_checkpointed(block, self.use_checkpoint, h, context)
        h = self.proj_out(h).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return h.contiguous(memory_format=memory_format_of(x)) + x


def _training_swap(module: nn.Module) -> Optional[nn.Module]:
    if type(module) is nn.GroupNorm:
        return _norm_swap(module)
    if type(module) is ScaledDotProductAttention:
        return retype(module, RoutedAttention)
    if type(module) is SpatialTransformer:
        if not module.use_linear_projection:
            module.proj_in, module.proj_out = retype(module.proj_in, TokenConv1x1), retype(module.proj_out, TokenConv1x1)
        return retype(module, TokenSpatialTransformer)
    return None


def optimize_for_cpu(model: nn.Module) -> nn.Module:
    """Swap in the CPU optimisations that keep parameters and keys (usable in training); returns `model`."""
    replace_modules(model, _training_swap)
    return model


def _norm_swap(module: nn.Module) -> Optional[nn.Module]:
    return retype(module, NchwBf16GroupNorm) if type(module) is nn.GroupNorm else None


def optimize_autoencoder_for_cpu(autoencoder: nn.Module) -> nn.Module:
    """The autoencoder's weights in channels_last, so that its convolutions run in oneDNN's native layout
    (with NCHW weights oneDNN converts layouts around every convolution, which makes SD's decoder at
    512 px several times slower in bf16), with the GroupNorm swap for small bf16 maps; keeps parameters
    and keys. Idempotent. Returns `autoencoder`."""
    autoencoder.to(memory_format=torch.channels_last)
    replace_modules(autoencoder, _norm_swap)
    return autoencoder


def trim_heap() -> None:
    """Hand the heap's freed pages back to the kernel (glibc's malloc_trim; elsewhere nothing): glibc keeps
    the freed mid-size blocks of earlier ops in its arenas, where a later phase's large, separately mapped
    buffers would otherwise stack on top of them in resident memory."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------- inference


def prepack_available() -> bool:
    """oneDNN's packed-weight ops exist in this torch build (x86 and most Arm CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class FusedSelfAttention(nn.Module):
    """Self-attention with q, k and v from one matmul on the concatenated weights: one larger call."""

    def __init__(self, attention_module: Attention) -> None:
        super().__init__()
        self.heads = attention_module.heads
        weight = torch.cat([attention_module.to_q.weight, attention_module.to_k.weight, attention_module.to_v.weight])
        self.to_qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        self.to_qkv.weight.data.copy_(weight)
        self.attend = attention_module.attend
        self.to_out = attention_module.to_out

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        q, k, v = (split_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out[0](merge_heads(self.attend(q, k, v)))


class PackedConv2d(nn.Module):
    """A zero-padded Conv2d calling oneDNN on a weight packed once, at the first call, for that input's shape
    (other shapes still compute right)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.options = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)  # under autocast a preceding op may hand float32 to these non-autocast ops
        if not self.weight.is_mkldnn:
            packed = torch.ops.mkldnn._reorder_convolution_weight(self.weight.detach(), *self.options, list(x.shape))
            self.weight = nn.Parameter(packed, requires_grad=False)  # replaces the plain copy
        out = torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.options, "none", [], "")
        # oneDNN answers in channels_last; hand back the input's layout, as nn.Conv2d does (norms that
        # follow are several times slower on mixed layouts)
        return out.contiguous(memory_format=memory_format_of(x))


class PackedLinear(nn.Module):
    """A Linear (or a `TokenConv1x1`) calling oneDNN on a weight packed once, at the first call."""

    def __init__(self, layer: nn.Linear | TokenConv1x1) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().flatten(1), requires_grad=False)
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if not self.weight.is_mkldnn:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), x.numel() // x.shape[-1])
            self.weight = nn.Parameter(packed, requires_grad=False)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _fuse_swap(module: nn.Module) -> Optional[nn.Module]:
    if isinstance(module, TransformerBlock) and type(module.attn1) is Attention:
        module.attn1 = FusedSelfAttention(module.attn1)
    return None


def packable(weight: Tensor) -> bool:
    """oneDNN packs fp32 weights on any x86 CPU, bf16/fp16 ones only where the CPU has the instructions."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if weight.dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return weight.dtype == torch.float32


def _pack_swap(module: nn.Module) -> Optional[nn.Module]:
    if not isinstance(module, (nn.Linear, nn.Conv2d)) or not packable(module.weight):
        return None
    if type(module) in (nn.Linear, TokenConv1x1):
        # fp32 matmuls stay on MKL's GEMM, faster than oneDNN's packed kernel at the U-Net's shapes
        # (scripts/bench_packing.py); bf16 and fp16 ones gain from packing
        return PackedLinear(module) if module.weight.dtype != torch.float32 else None
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return PackedConv2d(module)
    return None


@torch.no_grad()
def optimize_for_cpu_inference(model: nn.Module) -> nn.Module:
    """`optimize_for_cpu`, then fused self-attention projections and packed weights (where this torch build
    has oneDNN). Makes `model` inference-only: convert dtype and device before, and load the model anew
    to train, convert or save it."""
    optimize_for_cpu(model)
    if prepack_available():
        replace_modules(model, _fuse_swap)
        replace_modules(model, _pack_swap)
    return model


