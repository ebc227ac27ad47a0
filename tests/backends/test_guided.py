"""The sampling-run layer changes speed, never results: a GuidedUNet on one latent with n texts equals the
plain U-Net on n copies of the latent, with guidance on and off, packed or not, on and off its run's grid."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm_cli.backends.cpu import optimize_for_cpu_inference
from ldm_cli.backends.guided import GuidedUNet
from tests.backends.cases import CASE_NAMES, unet_and_inputs

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
STEPS = torch.tensor([900.0, 500.0, 10.0])  # the run's timesteps
KEYS = [14.6, 2.1, 0.03]  # what the sampler calls them (its σ's)


def _plain_and_guided(case: str, texts_per_latent: int, dtype: torch.dtype, packed: bool):
    plain, sample, _, text = unet_and_inputs(case, rows=2, text_rows=2 * texts_per_latent)
    plain.to(dtype=dtype, memory_format=torch.channels_last)
    guided_unet = copy.deepcopy(plain)
    guided = GuidedUNet(guided_unet)
    if packed:
        optimize_for_cpu_inference(guided_unet)
    sample, text = sample.to(dtype).contiguous(memory_format=torch.channels_last), text.to(dtype)
    guided.begin_run(text, STEPS, KEYS, dtype)
    return plain, guided, sample, text


def _plain_guided_batch(plain, sample, t, text):
    """The plain way: every text row with its own copy of the latent."""
    copies = text.shape[0] // sample.shape[0]
    return plain(torch.cat([sample] * copies), torch.cat([t] * copies), text)


@pytest.mark.parametrize("packed", [False, True], ids=["eager", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("texts_per_latent", [1, 2], ids=["no_guidance", "guidance"])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_guided_unet_equals_the_plain_unet_on_every_step(case, texts_per_latent, dtype, packed):
    plain, guided, sample, text = _plain_and_guided(case, texts_per_latent, dtype, packed)
    with torch.inference_mode():
        for step, key in zip(STEPS, KEYS):
            t = step.expand(2)
            expected = _plain_guided_batch(plain, sample, t, text)
            actual = guided(sample, t, key)
            assert actual.shape == expected.shape == (2 * texts_per_latent, *sample.shape[1:])
            scale = expected.float().abs().max()
            torch.testing.assert_close(actual.float() / scale, expected.float() / scale, atol=TOLERANCE[dtype], rtol=0)
        # a step off the run's grid (adaptive samplers) is projected on the spot
        off = torch.tensor([321.5, 321.5])
        torch.testing.assert_close(guided(sample, off, 7.7), _plain_guided_batch(plain, sample, off, text),
                                   atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_the_layers_before_the_text_see_each_latent_once(case):
    plain, guided, sample, text = _plain_and_guided(case, texts_per_latent=2, dtype=torch.float32, packed=False)
    rows: list[int] = []
    guided.unet.conv_in.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    with torch.inference_mode():
        out = guided(sample, STEPS[0].expand(2), KEYS[0])
    assert rows == [2] and out.shape[0] == 4
    assert not torch.allclose(out[:2], out[2:])  # two texts, two outputs


def test_a_new_run_uses_its_own_text_and_the_state_dict_is_unchanged():
    plain, guided, sample, text = _plain_and_guided("conv_proj", texts_per_latent=1, dtype=torch.float32, packed=False)
    assert list(guided.unet.state_dict()) == list(plain.state_dict())
    other = text.flip(1)
    with torch.inference_mode():
        first = guided(sample, STEPS[:1].expand(2), KEYS[0])
        guided.begin_run(other, STEPS, KEYS, torch.float32)
        second = guided(sample, STEPS[:1].expand(2), KEYS[0])
        torch.testing.assert_close(second, plain(sample, STEPS[:1].expand(2), other), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, second)
