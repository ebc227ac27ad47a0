"""The CPU backend changes speed, never results: optimised U-Nets give the plain U-Net's outputs (and, for
the training variant, its gradients and state dict) across presets, dtypes and layouts."""

from __future__ import annotations

import copy
import os
import platform

import pytest
import torch
from torch import nn

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.backends.cpu import (
    NchwBf16GroupNorm, optimize_autoencoder_for_cpu, optimize_for_cpu, optimize_for_cpu_inference, packable, trim_heap,
)
from tests.backends.cases import CASE_NAMES, unet_and_inputs

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _prepared(case: str, dtype: torch.dtype, layout: str):
    unet, sample, t, text = unet_and_inputs(case)
    unet.to(dtype=dtype, memory_format=LAYOUTS[layout])
    return unet, (sample.to(dtype).contiguous(memory_format=LAYOUTS[layout]), t, text.to(dtype))


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert expected.abs().mean() > 1e-2  # a real signal, not zeros
    scale = expected.float().abs().max()
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_training_optimisations_keep_outputs_gradients_and_state_dict(case, dtype, layout):
    plain, inputs = _prepared(case, dtype, layout)
    optimised = optimize_for_cpu(copy.deepcopy(plain)).train()
    plain.train()
    assert list(optimised.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(optimised.state_dict().values(), plain.state_dict().values()))
    assert any(isinstance(m, NchwBf16GroupNorm) for m in optimised.modules())
    outputs = []
    for model in (plain, optimised):
        out = model(*inputs)
        out.float().square().mean().backward()
        outputs.append(out)
    _close(outputs[1], outputs[0], dtype)
    assert outputs[1].is_contiguous(memory_format=LAYOUTS[layout])
    scale = max(p.grad.float().abs().max() for p in plain.parameters())  # some grads are ~0 (a bias before a norm)
    for (name, a), b in zip(plain.named_parameters(), optimised.parameters()):
        torch.testing.assert_close(b.grad.float() / scale, a.grad.float() / scale, atol=10 * TOLERANCE[dtype], rtol=0, msg=name)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_inference_optimisations_keep_outputs(case, dtype, layout):
    plain, inputs = _prepared(case, dtype, layout)
    optimised = optimize_for_cpu_inference(copy.deepcopy(plain))
    with torch.inference_mode():
        expected = plain(*inputs)
        first, second = optimised(*inputs), optimised(*inputs)  # the first call packs, the second reuses
        small = optimised(inputs[0][..., :4, :4], inputs[1], inputs[2])  # a size it was not packed for
    _close(first, expected, dtype)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert small.shape == (2, 4, 4, 4)
    assert first.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("side", [8, 32])  # latent sides: 8 takes the small-map GroupNorm route in bf16
def test_autoencoder_optimisation_keeps_decodes_encodes_and_state_dict(dtype, side):
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16)
    plain = AutoencoderKL(config).to(dtype).eval()
    optimised = optimize_autoencoder_for_cpu(copy.deepcopy(plain))
    assert list(optimised.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(optimised.state_dict().values(), plain.state_dict().values()))
    z = torch.randn(2, 4, side, side).to(dtype)
    with torch.inference_mode():
        expected, decoded = plain.decode(z), optimised.decode(z)
        images = expected.clamp(-1, 1)
        expected_latent, latent = plain.encode(images).mode(), optimised.encode(images).mode()
    assert decoded.shape == (2, 3, 2 * side, 2 * side) and decoded.is_contiguous(memory_format=torch.channels_last)
    _close(decoded, expected, dtype)
    _close(latent, expected_latent, dtype)


def test_packed_weights_are_kept_once_and_converting_afterwards_fails_loudly():
    unet, inputs = _prepared("conv_proj", torch.float32, "channels_last")
    if not packable(unet.conv_in.weight):
        pytest.skip("this torch build or CPU cannot pack fp32 weights for oneDNN")
    optimize_for_cpu_inference(unet)
    with torch.inference_mode():
        unet(*inputs)
    transformer = unet.down_blocks[0].attentions[0]
    assert unet.conv_in.weight.is_mkldnn and unet.down_blocks[0].resnets[0].conv1.weight.is_mkldnn
    # fp32 matmuls stay on MKL's faster GEMM
    assert not transformer.transformer_blocks[0].ff.net[2].weight.is_mkldnn and not transformer.proj_in.weight.is_mkldnn
    assert not unet.down_blocks[0].resnets[0].time_emb_proj.weight.is_mkldnn
    with pytest.raises((RuntimeError, NotImplementedError)):
        unet.to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (1, 64, 32, 32), (2, 512, 8, 8)])
def test_nchw_group_norm_equals_group_norm_forward_and_backward_in_the_same_layout(shape):
    generator = torch.Generator().manual_seed(3)
    plain = nn.GroupNorm(8 if shape[1] == 64 else 32, shape[1]).bfloat16()  # 8 or 16 channels per group
    with torch.no_grad():
        plain.weight.normal_(generator=generator)
        plain.bias.normal_(generator=generator)
    routed = NchwBf16GroupNorm(plain.num_groups, plain.num_channels).bfloat16()
    routed.load_state_dict(plain.state_dict())
    x = (torch.randn(shape, generator=generator) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    results = []
    for norm in (plain, routed):
        leaf = x.detach().clone().requires_grad_()
        out = norm(leaf)
        (out.float() ** 2).sum().backward()
        results.append((out, leaf.grad))
    (expected, expected_grad), (out, grad) = results
    assert out.is_contiguous(memory_format=torch.channels_last) and grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(grad.float(), expected_grad.float(), atol=5e-2, rtol=5e-2)


def resident_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    raise OSError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or platform.libc_ver()[0] != "glibc", reason="glibc on Linux")
def test_trim_heap_returns_freed_heap_blocks_to_the_kernel():
    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each: heap blocks, under glibc's mmap threshold
    pin = torch.ones(16 * 1024)  # a live block above them: glibc cannot shrink the heap from its top
    del blocks
    before = resident_mib()
    trim_heap()
    assert resident_mib() < before - 100  # 187 MiB were freed
    assert pin.sum() == 16 * 1024
