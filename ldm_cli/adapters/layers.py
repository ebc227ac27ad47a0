"""One LoRA layer in a layout-free form, and the weight change it makes.

Every file format is read into `{target: LoraLayer}`, where a target is `unet.<module path>` or
`text_encoder.<module path>` (the module paths are diffusers' / transformers' parameter names, which
ldm's models keep), so merging and writing never care where a layer came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

UNET, TEXT_ENCODER = "unet", "text_encoder"
PARTS = (UNET, TEXT_ENCODER)


@dataclass
class LoraLayer:
    """W' = W + scale * (alpha / rank) * up @ down, for a linear or a convolution weight W."""

    down: Tensor  # [rank, in] or [rank, in, kh, kw]
    up: Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, weight_shape: torch.Size | tuple[int, ...], scale: float = 1.0) -> Tensor:
        """The float32 change to a weight of `weight_shape` (the caller checks the shapes first)."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return ((scale * self.alpha / self.rank) * (up @ down)).reshape(weight_shape)

    def fits(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether up @ down has the shape of the weight (conv: kernel taken from `down`)."""
        out_features, in_features = weight_shape[0], weight_shape[1] if len(weight_shape) > 1 else None
        if self.up.shape[0] != out_features or self.up.shape[1] != self.rank or self.down.shape[1] != in_features:
            return False
        if self.up.dim() > 2 and tuple(self.up.shape[2:]) != (1, 1):
            return False
        kernel = tuple(self.down.shape[2:])
        expected = tuple(weight_shape[2:])
        return kernel == expected or (not expected and kernel in ((), (1, 1))) or (not kernel and expected == (1, 1))


def split_target(target: str) -> tuple[str, str]:
    """`unet.down_blocks.0…to_q` → ("unet", "down_blocks.0…to_q")."""
    part, _, path = target.partition(".")
    return part, path
