"""Gaussian noise that does not depend on the device or the batch: drawn from CPU generators, one per
image where each image must keep its own stream, then moved to the device in one copy."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ldm_cli.errors import ConfigError

Generators = torch.Generator | Sequence[torch.Generator] | None


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def initial_noise(seed: int, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The start noise ε of the image with this seed: float32, drawn on the CPU, so the same on every device.
    Pass `generator` (seeded with `seed`) to keep drawing from the same stream afterwards."""
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """N(0, I) of x's shape, dtype and device. `generator`: one for the whole batch, or one per image (row i
    from generator i alone, so an image's noise never depends on its batch-mates)."""
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn(x.shape[1:], generator=one, device=one.device, dtype=x.dtype) for one in generator]
        return torch.stack(rows).to(x.device)  # one copy to the device, not one per image
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def sample_noise(x0: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε ~ N(0, I) for x0's shape, plus offset noise (Guttenberg 2023): offset · N(0, 1) per (sample, channel).

    The per-channel constant lets the model learn to change an image's mean brightness.
    """
    if offset_noise < 0:
        raise ConfigError(f"offset_noise must be >= 0 (0.05–0.1 is typical), got {offset_noise}")
    noise = randn_like(x0, generator)
    if offset_noise > 0:
        noise = noise + offset_noise * randn_like(x0.new_empty(*x0.shape[:2], *([1] * (x0.ndim - 2))), generator)
    return noise
