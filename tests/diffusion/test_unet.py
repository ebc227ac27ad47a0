"""The from-scratch U-Net against diffusers' UNet2DConditionModel: names, shapes and numbers."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_cli.diffusion.unet import UNet, timestep_embedding
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
