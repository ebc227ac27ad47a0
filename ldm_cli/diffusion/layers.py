"""Pieces the U-Net's blocks share: a GroupNorm that avoids a slow CPU kernel, optional activation
checkpointing, and widening a batch to the text's rows (classifier-free guidance)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# aten's channels-last GroupNorm has no fast bf16 path for fewer than 16 channels per group on maps
# under 1024 pixels: 4-15x slower there than in NCHW (forward and backward).
SLOW_NHWC_NORM_MAX_PIXELS = 1023
SLOW_NHWC_NORM_MAX_GROUP_CHANNELS = 15


def run_checkpointed(module: nn.Module, use_checkpoint: bool, *args: Any) -> Tensor:
    """Call `module`, recomputing it in backward instead of storing activations when asked."""
    if use_checkpoint and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def widen(x: Tensor, batch: int) -> Tensor:
    """`x` ([B, ...]) as `batch` = n·B rows: n copies of the batch, in the order of the text rows
    [copy 0 of every sample, copy 1, ...]; unchanged when it already has `batch` rows."""
    if x.shape[0] == batch:
        return x
    return torch.cat([x] * (batch // x.shape[0]))  # cat keeps channels_last, where repeat would not


def memory_format_of(x: Tensor) -> torch.memory_format:
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
