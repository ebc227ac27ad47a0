"""The from-scratch U-Net against diffusers' UNet2DConditionModel: names, shapes and numbers."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_cli.diffusion.layers import GroupNorm
from ldm_cli.diffusion.transformer import SpatialTransformer, TransformerBlock
from ldm_cli.diffusion.unet import ResnetBlock, UNet, timestep_embedding
from ldm_cli.diffusion.unet_config import UNetConfig
from ldm_cli.errors import ConfigError

diffusers = pytest.importorskip("diffusers")

PRESETS = Path(__file__).resolve().parents[2] / "ldm_cli" / "configs" / "unet"
SD15_PARAMETERS = 859_520_964

TWO_LEVELS = dict(sample_size=16, block_out_channels=[32, 64], cross_attention_dim=32)
REFERENCE_CASES = {
    # SD1 layout in miniature: attention at the fine level, 1x1 conv projections, heads as an int
    "conv_proj": UNetConfig(
        **TWO_LEVELS, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, attention_head_dim=8,
        norm_num_groups=32,
    ),
    # SD2-style linear projections, heads as a per-block list, attention at the coarse level
    "linear_proj": UNetConfig(
        **TWO_LEVELS, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2, attention_head_dim=[2, 4],
        norm_num_groups=8, use_linear_projection=True,
    ),
    # three levels, deeper transformers, per-block resnet counts, no flip / shifted frequencies
    "three_levels": UNetConfig(
        sample_size=16, block_out_channels=[16, 32, 32], cross_attention_dim=24,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=[1, 2, 1], transformer_layers_per_block=2, attention_head_dim=[2, 4, 8],
        norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core box: extra intra-op threads only spin (measured 3-4x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pair(config: UNetConfig) -> tuple[torch.nn.Module, UNet]:
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**config.to_diffusers_config()).eval()
    ours = UNet(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def _load_preset(name: str) -> UNetConfig:
    merged = OmegaConf.merge(OmegaConf.structured(UNetConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_diffusers_outputs_and_names(case: str) -> None:
    config = REFERENCE_CASES[case]
    reference, ours = _pair(config)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert _shapes(ours) == _shapes(reference)

    generator = torch.Generator().manual_seed(1)
    context = torch.randn(2, 7, config.cross_attention_dim, generator=generator)
    # a side not divisible by the downsample factor exercises diffusers' `upsample_size` path
    for (height, width), timestep in (((16, 16), torch.tensor([0, 999])), ((13, 11), 37.5)):
        sample = torch.randn(2, 4, height, width, generator=generator)
        with torch.no_grad():
            expected = reference(sample, timestep, context).sample
            actual = ours(sample, timestep, context)
        assert actual.shape == (2, 4, height, width)
        assert expected.abs().mean() > 1e-2  # a meaningful comparison, not zeros vs zeros
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_timestep_may_be_a_scalar_or_one_per_sample() -> None:
    torch.manual_seed(0)
    model = UNet(REFERENCE_CASES["conv_proj"]).eval()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32)
    with torch.no_grad():
        per_sample = model(sample, torch.tensor([500.0, 500.0]), context)
        for timestep in (500, 500.0, torch.tensor(500), torch.tensor([500])):
            torch.testing.assert_close(model(sample, timestep, context), per_sample, atol=0, rtol=0)
        different = model(sample, torch.tensor([500, 20]), context)
    torch.testing.assert_close(different[0], per_sample[0], atol=0, rtol=0)
    assert not torch.allclose(different[1], per_sample[1])


def _model_sample_text(case: str, seed: int, text_rows: int = 2) -> tuple[UNet, torch.Tensor, torch.Tensor]:
    """A random eval-mode U-Net of a reference case, two 16x16 latents and `text_rows` 7-token texts."""
    config = REFERENCE_CASES[case]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    return UNet(config).eval(), sample, torch.randn(text_rows, 7, config.cross_attention_dim, generator=generator)


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_projected_text_gives_the_same_output_as_the_text(case: str) -> None:
    model, sample, context = _model_sample_text(case, seed=2)
    with torch.no_grad():
        text = model.project_text(context)
        layers = sum(len(block.transformer_blocks) for block in model.modules() if isinstance(block, SpatialTransformer))
        assert len(text.layers) == layers > 0
        keys, values = text.layers[0]
        assert keys.shape[-2] == values.shape[-2] == 7  # [B, heads, L, d]: one key and value per text token
        expected = model(sample, torch.tensor([3, 700]), context)
        torch.testing.assert_close(model(sample, torch.tensor([3, 700]), text), expected, atol=0, rtol=0)
        # and the projections really are used: other text, other output
        other = model.project_text(context.flip(1))
        assert not torch.allclose(model(sample, torch.tensor([3, 700]), other), expected)


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_projected_time_gives_the_same_output_as_the_timestep(case: str) -> None:
    model, sample, context = _model_sample_text(case, seed=3)
    resnets = [module for module in model.modules() if isinstance(module, ResnetBlock)]
    with torch.no_grad():
        # one timestep for the whole batch, projected alone or as a row of a run's several steps
        expected = model(sample, 700, context)
        steps = model.project_time(torch.tensor([900.0, 700.0, 20.0]), torch.float32)
        assert len(steps.layers) == len(resnets) > 0
        assert [layer.shape for layer in steps.layers] == [(3, r.conv1.out_channels, 1, 1) for r in resnets]
        for time in (model.project_time(700, torch.float32), type(steps)(tuple(layer[1:2] for layer in steps.layers))):
            torch.testing.assert_close(model(sample, time, context), expected, atol=1e-5, rtol=1e-5)  # rows round apart
        # one timestep per sample, and the projections really are used: another step, another output
        per_sample = model(sample, torch.tensor([3, 700]), context)
        torch.testing.assert_close(model(sample, model.project_time(torch.tensor([3, 700]), torch.float32), context), per_sample)
        assert not torch.allclose(model(sample, model.project_time(20, torch.float32), context), expected)
        with pytest.raises(ValueError, match="3 timesteps for 2 samples"):
            model(sample, steps, context)


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_one_latent_with_several_texts_runs_the_layers_before_the_text_once(case: str) -> None:
    model, sample, texts = _model_sample_text(case, seed=4, text_rows=4)  # texts: [uncond x2, cond x2]
    timestep = torch.tensor([3.0, 700.0])
    conv_in_rows: list[int] = []
    model.conv_in.register_forward_hook(lambda module, args, output: conv_in_rows.append(args[0].shape[0]))
    with torch.no_grad():
        expected = model(torch.cat([sample, sample]), torch.cat([timestep, timestep]), texts)
        for text in (texts, model.project_text(texts)):
            torch.testing.assert_close(model(sample, timestep, text), expected, atol=1e-5, rtol=1e-5)
    assert conv_in_rows == [4, 2, 2]  # the shared layers saw each latent once
    assert not torch.allclose(expected[:2], expected[2:])  # the two texts really give two outputs
    with pytest.raises(ValueError, match="multiple"):
        model(sample, timestep, texts[:3])


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_fused_self_attention_projections_give_the_same_output(case: str) -> None:
    model, sample, context = _model_sample_text(case, seed=5)
    self_attentions = [block.attn1 for block in model.modules() if isinstance(block, TransformerBlock)]
    first = self_attentions[0]
    weights = [first.to_q.weight.clone(), first.to_k.weight.clone(), first.to_v.weight.clone()]
    with torch.no_grad():
        expected = model(sample, torch.tensor([3, 700]), context)
        for attention in self_attentions:
            attention.fuse_qkv()
        fused = model(sample, torch.tensor([3, 700]), context)
    torch.testing.assert_close(first.to_qkv.weight, torch.cat(weights), atol=0, rtol=0)
    assert not hasattr(first, "to_q") and "to_q.weight" not in dict(first.named_parameters())
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


def test_our_weights_load_into_diffusers_strictly() -> None:
    config = REFERENCE_CASES["linear_proj"]
    torch.manual_seed(3)
    ours = UNet(config).eval()
    reference = diffusers.UNet2DConditionModel(**config.to_diffusers_config()).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = reference(sample, 10, context).sample
        torch.testing.assert_close(ours(sample, 10, context), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (33, False, 1), (8, True, 1)])
def test_timestep_embedding_matches_diffusers(dim: int, flip: bool, shift: int) -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = torch.tensor([0.0, 1.0, 17.5, 999.0])
    expected = get_timestep_embedding(timesteps, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    torch.testing.assert_close(timestep_embedding(timesteps, dim, flip, shift), expected, atol=0, rtol=0)


def test_sd15_has_exact_parameter_count_and_diffusers_names() -> None:
    config = _load_preset("sd15")
    assert asdict(config) == asdict(UNetConfig())  # the dataclass defaults are SD v1.5
    with torch.device("meta"):  # no memory, no init cost
        ours = UNet(config)
        reference = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    assert ours.num_parameters() == SD15_PARAMETERS
    assert sum(p.numel() for p in reference.parameters()) == SD15_PARAMETERS
    assert _shapes(ours) == _shapes(reference)
    assert ours.downsample_factor == 8
    with torch.no_grad():
        out = ours(torch.empty(2, 4, 64, 64, device="meta"), 999, torch.empty(2, 77, 768, device="meta"))
    assert out.shape == (2, 4, 64, 64)


@pytest.mark.parametrize("name, low, high", [("small", 30e6, 42e6), ("tiny", 2e6, 5e6)])
def test_presets_compose_and_run(name: str, low: float, high: float) -> None:
    config = _load_preset(name)
    assert isinstance(config, UNetConfig) and config.cross_attention_dim == 384
    torch.manual_seed(0)
    model = UNet(config).eval()
    print(f"{name}: {model.num_parameters():,} parameters")
    assert low <= model.num_parameters() <= high
    side = 2 * config.downsample_factor
    with torch.no_grad():
        out = model(torch.randn(2, 4, side, side), torch.tensor([1, 900]), torch.randn(2, 6, 384))
    assert out.shape == (2, 4, side, side) and torch.isfinite(out).all()


def test_preset_files_start_with_a_comment() -> None:
    for name in ("sd15", "small", "tiny"):
        assert (PRESETS / f"{name}.yaml").read_text().startswith("# ")


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    config = REFERENCE_CASES["three_levels"]
    torch.manual_seed(0)
    plain = UNet(config).train()
    checkpointed = UNet(UNetConfig(**{**asdict(config), "gradient_checkpointing": True})).train()
    checkpointed.load_state_dict(plain.state_dict())
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    target = torch.randn(2, 4, 8, 8)
    losses = []
    for model in (plain, checkpointed):
        loss = torch.nn.functional.mse_loss(model(sample, torch.tensor([5, 700]), context), target)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, p_plain), p_checkpointed in zip(plain.named_parameters(), checkpointed.parameters()):
        assert p_plain.grad is not None, name
        torch.testing.assert_close(p_checkpointed.grad, p_plain.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last_and_bf16_autocast() -> None:
    config = REFERENCE_CASES["conv_proj"]
    torch.manual_seed(0)
    model = UNet(config).eval()
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = model(sample, 50, context)
        model_cl = model.to(memory_format=torch.channels_last)
        actual = model_cl(sample.to(memory_format=torch.channels_last), 50, context)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_precision = model(sample, 50, context)
    assert low_precision.dtype == torch.bfloat16
    assert (low_precision.float() - expected).abs().max() < 0.1 * expected.abs().max()


BAD_CONFIGS = {
    "length mismatch": dict(block_out_channels=[32, 64]),
    "unknown down type": dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["AttnDownBlock2D"]),
    "unknown up type": dict(up_block_types=["UpBlock2D"] * 3 + ["SimpleUpBlock2D"]),
    "unknown mid type": dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
    "groups": dict(block_out_channels=[320, 640, 1280, 1000]),
    "heads": dict(attention_head_dim=7),
    "heads list length": dict(attention_head_dim=[8, 8]),
    "zero layers": dict(layers_per_block=0),
    "transformer layers list": dict(transformer_layers_per_block=[1, 1, "two", 1]),
    "heads not an int": dict(attention_head_dim=8.5),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_raises_config_error(case: str) -> None:
    with pytest.raises(ConfigError, match="unet"):
        UNetConfig(**BAD_CONFIGS[case])


def test_bad_yaml_override_raises_config_error_through_omegaconf() -> None:
    merged = OmegaConf.merge(OmegaConf.structured(UNetConfig), {"block_out_channels": [64, 128, 250, 256]})
    with pytest.raises(ConfigError, match=r"block_out_channels\[2\]=250"):
        OmegaConf.to_object(merged)


def test_non_attention_levels_do_not_need_divisible_heads() -> None:
    config = UNetConfig(
        block_out_channels=[48, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 8], norm_num_groups=16,
    )
    assert config.heads() == [5, 8] and config.downsample_factor == 2


@pytest.mark.parametrize(("shape", "via_nchw"), [((2, 64, 8, 8), True), ((1, 64, 32, 32), False), ((2, 512, 8, 8), False)])
def test_group_norm_on_small_nhwc_bf16_maps_computes_the_same_in_the_same_layout(shape, via_nchw, monkeypatch):
    """Small bf16 channels-last maps go through NCHW (aten's NHWC kernel is slow there), forward and backward."""
    norm = GroupNorm(8 if shape[1] == 64 else 32, shape[1]).bfloat16()  # 8 or 16 channels per group
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    x = (torch.randn(shape, generator=generator) * 3 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    expected = norm(x.contiguous())
    (expected.float() ** 2).sum().backward()
    expected_grad, x.grad = x.grad, None
    copies = []
    original_contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(k) or original_contiguous(t, *a, **k))
    out = norm(x)
    monkeypatch.undo()
    assert bool(copies) == via_nchw  # only small maps with few channels per group take the NCHW route
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    (out.float() ** 2).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.grad.float(), expected_grad.float(), atol=5e-2, rtol=5e-2)
