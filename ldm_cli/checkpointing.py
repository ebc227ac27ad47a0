"""Activation checkpointing, the one helper both the U-Net and the autoencoder call."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def run_checkpointed(module: nn.Module, use_checkpoint: bool, *args: Any) -> Tensor:
    """Call `module`, recomputing it in backward instead of storing its activations when asked
    (only while training with gradients: nothing is stored to recompute otherwise)."""
    if use_checkpoint and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
