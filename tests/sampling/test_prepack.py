"""Packed oneDNN weights for CPU inference: same numbers as the plain layers, one copy of each weight,
and a loud error instead of stale weights when the module is converted afterwards."""

import pytest
import torch
from torch import nn

from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.diffusion.transformer import TransformerBlock
from ldm_cli.diffusion.unet import UNet
from ldm_cli.sampling.pipeline import ImageJob, SamplingPipeline, SamplingSettings
from ldm_cli.sampling.prepack import MIN_LINEAR_ROWS, is_prepacked, prepack_available, prepack_for_cpu
from tests.sampling.helpers import tiny_unet_config, write_tiny_latent_diffusion

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN")


def _unet_and_inputs(dtype: torch.dtype) -> tuple[UNet, tuple]:
    torch.manual_seed(0)
    config = tiny_unet_config()
    unet = UNet(config).eval().to(dtype)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, config.in_channels, 16, 16, generator=generator).to(dtype)
    text = torch.randn(4, 5, config.cross_attention_dim, generator=generator).to(dtype)
    return unet, (sample, torch.tensor([10.0, 900.0]), text)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_unet_computes_what_the_plain_one_does(dtype, tolerance):
    unet, inputs = _unet_and_inputs(dtype)
    with torch.inference_mode():
        expected = unet(*inputs)
        layers_before = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())
        self_attentions = [block.attn1 for block in unet.modules() if isinstance(block, TransformerBlock)]
        packed = prepack_for_cpu(unet)
        # each self-attention's q, k and v projections became one
        assert self_attentions and all(a.to_qkv is not None and not hasattr(a, "to_q") for a in self_attentions)
        assert packed == layers_before - 2 * len(self_attentions)
        first, second = unet(*inputs), unet(*inputs)  # the first call packs, the second reuses
        other_size = unet(inputs[0][:, :, :8, :8], inputs[1], inputs[2])  # a shape it was not packed for
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(first.float(), expected.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    assert other_size.shape == (4, 4, 8, 8)


def test_each_weight_is_kept_once_and_converting_afterwards_fails_loudly():
    unet, inputs = _unet_and_inputs(torch.float32)
    prepack_for_cpu(unet)
    with torch.inference_mode():
        unet(*inputs)
    assert is_prepacked(unet)
    transformer = unet.down_blocks[0].attentions[0]
    assert unet.conv_in.weight.is_mkldnn and transformer.transformer_blocks[0].ff.net[2].weight.is_mkldnn
    # SD1's 1x1-convolution projections run on tokens, as packed matmuls
    assert transformer.proj_in.weight.is_mkldnn and transformer.proj_in.weight.dim() == 2
    with pytest.raises((RuntimeError, NotImplementedError)):
        unet.to(torch.bfloat16)


@pytest.mark.parametrize(("dtype", "packed"), [(torch.float32, False), (torch.bfloat16, True)])
def test_one_row_projections_are_packed_only_where_that_is_faster(dtype, packed):
    # one row per image: the time-embedding projections; MKL's fp32 matrix-vector product beats oneDNN's
    unet, inputs = _unet_and_inputs(dtype)
    prepack_for_cpu(unet)
    with torch.inference_mode():
        unet(*inputs)
    assert inputs[0].shape[0] < MIN_LINEAR_ROWS
    assert unet.down_blocks[0].resnets[0].time_emb_proj.weight.is_mkldnn == packed
    assert unet.conv_in.weight.is_mkldnn


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_latent_diffusion(tmp_path_factory.mktemp("prepack") / "model")


def test_pipeline_packs_on_the_cpu_and_samples_the_same_images(model_dir):
    jobs, settings = [ImageJob("a red circle", 3), ImageJob("a blue square", 4)], SamplingSettings(steps=3, height=16, width=16)
    plain = SamplingPipeline(load_latent_diffusion(model_dir), "cpu", "fp32", prepack=False)
    packed = SamplingPipeline(load_latent_diffusion(model_dir), "cpu", "fp32")
    assert not is_prepacked(plain.model.unet) and is_prepacked(packed.model.unet)
    torch.testing.assert_close(packed(jobs, settings), plain(jobs, settings), atol=1e-5, rtol=0)
    # a second pipeline on the same (now inference-only) model: fine in its dtype, refused in another
    assert torch.equal(SamplingPipeline(packed.model, "cpu", "fp32")(jobs, settings), packed(jobs, settings))
    with pytest.raises(ValueError, match="load the model again"):
        SamplingPipeline(packed.model, "cpu", "bf16")

