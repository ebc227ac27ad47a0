"""Classifier-free guidance (Ho & Salimans 2022), written once for sampling and training previews."""

from __future__ import annotations

import torch


def guide(unconditional: torch.Tensor, conditional: torch.Tensor, scale: float) -> torch.Tensor:
    """D_u + w (D_c − D_u). Guiding the x_0 estimate equals guiding ε (or v): both are affine in the
    network output with the same coefficients in the two branches."""
    return unconditional + scale * (conditional - unconditional)
