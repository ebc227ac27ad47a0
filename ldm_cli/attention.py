"""softmax(q kᵀ / √d) v, with the kernel chosen for the hardware (shared by the U-Net and the autoencoder).

`F.scaled_dot_product_attention` is the right call almost everywhere: flash/memory-efficient kernels
on CUDA, and a flash kernel on the CPU that never materialises the score matrix. One exception,
measured by `scripts/bench_attention.py`: on the CPU in bf16/fp16, the flash kernel is 1.3–7× slower
(forward and backward) than two plain batched matmuls while the score matrix is small — the shapes
of small U-Nets, low-resolution levels and all text cross-attention at CPU sizes. There the scores
are formed explicitly (softmax in fp32, for accuracy); past `EXPLICIT_MAX_SCORES` scores per head,
and in fp32, the fused kernel is as fast or faster and bounded in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest query x key length product for which the explicit product is used (CPU, bf16/fp16):
# at 256x256 both are on par in training, at 1024x1024 the fused kernel is 2–3x faster.
EXPLICIT_MAX_SCORES = 2**17
_REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def uses_explicit_scores(query: Tensor, key: Tensor) -> bool:
    """True where `attention` forms the score matrix with plain matmuls instead of the fused kernel."""
    return (
        query.device.type == "cpu"
        and query.dtype in _REDUCED_PRECISION
        and query.shape[-2] * key.shape[-2] <= EXPLICIT_MAX_SCORES
    )


def attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Scaled dot-product attention over the last two dims: [..., Lq, d], [..., Lk, d] -> [..., Lq, d]."""
    if uses_explicit_scores(query, key):
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        return scores.float().softmax(dim=-1).to(value.dtype) @ value
    return F.scaled_dot_product_attention(query, key, value)
