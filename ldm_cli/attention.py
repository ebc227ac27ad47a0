"""softmax(q kᵀ / √d) v, with the kernel chosen for the hardware (the CPU backend's attention and the
autoencoder's).

`F.scaled_dot_product_attention` is the right call almost everywhere: flash/memory-efficient kernels
on CUDA, and a flash kernel on the CPU that never materialises the score matrix. The exception: on the
CPU in bf16/fp16 the flash kernel is several times slower than two plain batched matmuls while the
score matrix is small (small U-Nets, low-resolution levels, text cross-attention), so there the scores
are formed explicitly (softmax in fp32, for accuracy), except for the smallest forward-only calls,
where the explicit form's fixed overhead costs more. `scripts/bench_attention.py` measures each shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Largest query x key length product for which the explicit product is used (CPU, bf16/fp16):
# at 256x256 both are on par in training, at 1024x1024 the fused kernel is 2–3x faster.
EXPLICIT_MAX_SCORES = 2**17
# Without a backward, the fused kernel is 1.3-2.5x faster while batch x heads <= 32 and all heads'
# scores together <= 2**15 (its cost grows per head, the explicit one's is mostly fixed).
FUSED_FORWARD_MAX_BATCH_HEADS = 32
FUSED_FORWARD_MAX_SCORES = 2**15
_REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def uses_explicit_scores(query: Tensor, key: Tensor, value: Tensor | None = None) -> bool:
    """True where `attention` forms the score matrix with plain matmuls instead of the fused kernel."""
    if query.device.type != "cpu" or query.dtype not in _REDUCED_PRECISION:
        return False
    scores_per_head = query.shape[-2] * key.shape[-2]
    batch_heads = query.numel() // (query.shape[-2] * query.shape[-1])
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value))
    if not backward and batch_heads <= FUSED_FORWARD_MAX_BATCH_HEADS and batch_heads * scores_per_head <= FUSED_FORWARD_MAX_SCORES:
        return False
    return scores_per_head <= EXPLICIT_MAX_SCORES


def attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Scaled dot-product attention over the last two dims: [..., Lq, d], [..., Lk, d] -> [..., Lq, d]."""
    if uses_explicit_scores(query, key, value):
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        return scores.float().softmax(dim=-1).to(value.dtype) @ value
    return F.scaled_dot_product_attention(query, key, value)
