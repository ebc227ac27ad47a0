"""Restoring an optimiser from a checkpoint without losing its parameters' memory layouts."""

from __future__ import annotations

from typing import Any

import torch


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, then give each per-parameter state tensor (Adam's moments)
    its parameter's strides.

    Checkpoints store tensors contiguous, so a channels_last parameter's moments come back in NCHW.
    Fused AdamW walks parameter, gradient and moments as flat memory: with different layouts it would
    update every weight with another weight's moments, silently, from the first step after a resume."""
    optimizer.load_state_dict(state)
    for parameter, parameter_state in optimizer.state.items():
        for name, value in parameter_state.items():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.stride() != parameter.stride():
                parameter_state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with tensors shared between parameters copied apart.

    bitsandbytes' 8-bit optimisers give every parameter the same quantisation maps (one tensor);
    safetensors refuses to write a tensor twice, so later references get their own copy."""
    state = optimizer.state_dict()
    seen: set[tuple[int, int]] = set()

    def separate(node: dict[Any, Any]) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                separate(value)
            elif isinstance(value, torch.Tensor) and value.numel():
                key = (value.untyped_storage().data_ptr(), value.storage_offset())
                if key in seen:
                    node[name] = value.clone()
                seen.add(key)

    separate(state["state"])
    return state
