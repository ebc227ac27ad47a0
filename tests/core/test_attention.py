import pytest
import torch
import torch.nn.functional as F

from ldm_cli.attention import (
    EXPLICIT_MAX_SCORES, FUSED_FORWARD_MAX_BATCH_HEADS, FUSED_FORWARD_MAX_SCORES, attention, uses_explicit_scores,
)


def _qkv(query_length: int, key_length: int, dtype: torch.dtype, requires_grad: bool = False, batch: int = 16):
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, 3, query_length, 16), (batch, 3, key_length, 16), (batch, 3, key_length, 16)]
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_(requires_grad) for shape in shapes]


def _reference(query, key, value):
    """softmax(q kᵀ / √d) v in float64, from the definition."""
    query, key, value = (t.detach().double() for t in (query, key, value))
    weights = torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, dim=-1)
    return weights @ value


def test_kernel_choice_follows_device_dtype_and_size():
    small_bf16 = _qkv(64, 77, torch.bfloat16)
    assert uses_explicit_scores(small_bf16[0], small_bf16[1])
    assert uses_explicit_scores(*_qkv(64, 77, torch.float16)[:2])
    assert not uses_explicit_scores(*_qkv(64, 77, torch.float32)[:2])  # fp32: the fused kernel is as fast
    side = int(EXPLICIT_MAX_SCORES**0.5)
    assert uses_explicit_scores(*_qkv(side, side, torch.bfloat16)[:2])
    assert not uses_explicit_scores(*_qkv(side, side + 1, torch.bfloat16)[:2])  # past the limit: bounded memory


def test_smallest_forward_only_calls_use_the_fused_kernel():
    # batch 2 x 3 heads, 16 x 77 scores: far below both limits
    small = _qkv(16, 77, torch.bfloat16, batch=2)
    assert not uses_explicit_scores(*small)
    assert uses_explicit_scores(*_qkv(16, 77, torch.bfloat16, requires_grad=True, batch=2))  # a backward follows
    with torch.inference_mode():
        assert not uses_explicit_scores(*_qkv(16, 77, torch.bfloat16, requires_grad=False, batch=2))
    # past either limit the explicit form is faster again
    many_heads = FUSED_FORWARD_MAX_BATCH_HEADS // 3 + 1
    assert uses_explicit_scores(*_qkv(4, 4, torch.bfloat16, batch=many_heads))
    side = int((FUSED_FORWARD_MAX_SCORES / 6) ** 0.5) + 1
    assert uses_explicit_scores(*_qkv(side, side, torch.bfloat16, batch=2))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lengths, batch", [((16, 16), 16), ((16, 77), 16), ((16, 77), 2), ((600, 600), 2)])
def test_matches_the_definition(dtype, tolerance, lengths, batch):
    query, key, value = _qkv(*lengths, dtype, batch=batch)
    out = attention(query, key, value)
    assert out.shape == query.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), _reference(query, key, value), atol=tolerance, rtol=tolerance)


def test_explicit_path_gradients_match_the_fused_kernel():
    query, key, value = _qkv(16, 77, torch.bfloat16, requires_grad=True)
    assert uses_explicit_scores(query, key)
    upstream = torch.randn(query.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    (attention(query, key, value) * upstream).sum().backward()
    explicit = [t.grad.float() for t in (query, key, value)]

    fused_inputs = [t.detach().float().requires_grad_(True) for t in (query, key, value)]
    (F.scaled_dot_product_attention(*fused_inputs) * upstream.float()).sum().backward()
    for got, expected in zip(explicit, (t.grad for t in fused_inputs)):
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
