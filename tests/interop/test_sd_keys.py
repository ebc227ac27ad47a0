"""Original-SD <-> diffusers weight-name maps, checked against diffusers' own single-file
converters (used here only, as the independent reference) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_cli.errors import BundleError, IncompatibleError, UsageError
from ldm_cli.interop.detect import detect_prediction_type, detect_unet_config, detect_vae_config
from ldm_cli.interop.sd_keys import (
    check_keys,
    extract_ema_unet,
    installed_clip_uses_text_model_prefix,
    join_sd_checkpoint,
    split_sd_checkpoint,
    text_sd_to_transformers,
    text_transformers_to_sd,
    unet_diffusers_to_sd,
    unet_sd_to_diffusers,
    vae_diffusers_to_sd,
    vae_sd_to_diffusers,
)

UNET_CONFIGS = {
    "two_levels": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "three_levels_linear": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        cross_attention_dim=24,
        norm_num_groups=8,
        sample_size=16,
        attention_head_dim=4,
        use_linear_projection=True,
        transformer_layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
}
VAE_CONFIGS = {
    "two_levels": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1),
    "three_levels": dict(block_out_channels=(8, 16, 16), norm_num_groups=8, layers_per_block=2),
}


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values everywhere, so a swapped or dropped tensor cannot go unnoticed
    (diffusers zero-initialises some layers)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        assert torch.equal(actual[key], expected[key]), key


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def unet(request):
    model = UNet2DConditionModel(**UNET_CONFIGS[request.param])
    return model, random_weights(model, seed=0)


@pytest.fixture(scope="module", params=sorted(VAE_CONFIGS))
def vae(request):
    levels = len(VAE_CONFIGS[request.param]["block_out_channels"])
    model = AutoencoderKL(
        **VAE_CONFIGS[request.param],
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    return model, random_weights(model, seed=1)


@pytest.fixture(scope="module")
def clip():
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPTextModel(config)
    return model, random_weights(model, seed=2)


# ----------------------------------------------------------------------------- U-Net


def test_unet_to_sd_is_undone_by_diffusers_converter(unet):
    model, weights = unet
    original = unet_diffusers_to_sd(weights, model.config)
    assert all(not key.startswith(("down_blocks", "up_blocks", "mid_block")) for key in original)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, dict(model.config)), weights)


def test_unet_sd_to_diffusers_matches_diffusers_converter(unet):
    model, weights = unet
    original = unet_diffusers_to_sd(weights, model.config)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    reference = convert_ldm_unet_checkpoint(checkpoint, model.config)
    ours = unet_sd_to_diffusers(original, dict(model.config))  # a plain dict config works too
    assert_same_tensors(ours, reference)
    check_keys(ours, model.state_dict(), "U-Net")
    model.load_state_dict(ours, strict=True)


def test_unet_round_trip_is_bit_identical(unet):
    model, weights = unet
    assert_same_tensors(unet_sd_to_diffusers(unet_diffusers_to_sd(weights, model.config), model.config), weights)


def test_detect_unet_config_recovers_the_architecture(unet):
    model, weights = unet
    detected = detect_unet_config(weights)
    for name in (
        "in_channels",
        "out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "use_linear_projection",
        "transformer_layers_per_block",
        "mid_block_type",
    ):
        assert detected[name] == model.config[name], name
    for name in ("block_out_channels", "down_block_types", "up_block_types"):
        assert detected[name] == list(model.config[name]), name
    assert detected["attention_head_dim"] == (
        [c // 64 for c in model.config.block_out_channels] if model.config.use_linear_projection else 8
    )
    assert detect_unet_config(weights, attention_head_dim=4)["attention_head_dim"] == 4


def test_full_sd15_unet_key_set_maps():
    with torch.device("meta"):
        model = UNet2DConditionModel()  # the default config is SD v1's layout
    weights = model.state_dict()
    original = unet_diffusers_to_sd(weights, model.config)
    assert len(original) == len(weights) == 686
    for key in (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "output_blocks.11.0.out_layers.3.weight",
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "out.0.weight",
        "out.2.weight",
    ):
        assert key in original, key
    assert original["middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)  # conv in both layouts
    assert sorted(unet_sd_to_diffusers(original, model.config)) == sorted(weights)


def test_unet_with_a_missing_or_unknown_key_is_refused(unet):
    model, weights = unet
    original = unet_diffusers_to_sd(weights, model.config)
    broken = {k: v for k, v in original.items() if not k.startswith("output_blocks.1.")}
    broken["input_blocks.1.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(BundleError) as error:
        unet_sd_to_diffusers(broken, model.config)
    message = str(error.value)
    assert "missing (output_blocks.1.0.*" in message and "input_blocks.1.0.bogus.weight" in message
    assert "\n" not in message


def test_unet_with_a_dropped_tensor_fails_check_keys(unet):
    model, weights = unet
    original = unet_diffusers_to_sd(weights, model.config)
    del original["out.2.bias"]  # its module still has a weight, so only the per-key check sees it
    mapped = unet_sd_to_diffusers(original, model.config)
    with pytest.raises(BundleError, match=r"U-Net weights do not fit the model: 1 missing \(conv_out.bias\)"):
        check_keys(mapped, model.state_dict(), "U-Net")


def test_unsupported_block_type_is_refused():
    config = dict(UNET_CONFIGS["two_levels"], down_block_types=("AttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(IncompatibleError, match="AttnDownBlock2D"):
        unet_diffusers_to_sd({}, config)


# ----------------------------------------------------------------------------- VAE


def test_vae_to_sd_is_undone_by_diffusers_converter(vae):
    model, weights = vae
    original = vae_diffusers_to_sd(weights)  # layout read off the weights
    assert original["encoder.mid.attn_1.q.weight"].ndim == 4  # SD stores 1x1 convs
    checkpoint = {f"first_stage_model.{k}": v for k, v in original.items()}
    assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, model.config), weights)


def test_vae_sd_to_diffusers_matches_diffusers_converter(vae):
    model, weights = vae
    original = vae_diffusers_to_sd(weights, model.config)
    reference = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in original.items()}, model.config)
    for config in (model.config, None):
        ours = vae_sd_to_diffusers(original, config)
        assert_same_tensors(ours, reference)
    check_keys(ours, model.state_dict(), "VAE")
    model.load_state_dict(ours, strict=True)


def test_vae_round_trip_and_decoder_order(vae):
    model, weights = vae
    original = vae_diffusers_to_sd(weights, model.config)
    levels = len(model.config.block_out_channels)
    # decoder levels are numbered from full resolution in SD, from the bottom in diffusers
    top_level = weights[f"decoder.up_blocks.{levels - 1}.resnets.0.conv1.weight"]
    assert torch.equal(original["decoder.up.0.block.0.conv1.weight"], top_level)
    assert "decoder.up.0.upsample.conv.weight" not in original
    assert f"decoder.up.{levels - 1}.upsample.conv.weight" in original
    assert_same_tensors(vae_sd_to_diffusers(original, model.config), weights)


def test_vae_loss_weights_are_left_out_and_unknown_keys_refused(vae):
    model, weights = vae
    original = vae_diffusers_to_sd(weights)
    with_loss = {**original, "loss.discriminator.main.0.weight": torch.zeros(1)}
    assert_same_tensors(vae_sd_to_diffusers(with_loss), weights)
    with pytest.raises(BundleError, match=r"1 unexpected \(encoder.mid.attn_2.q.weight\)"):
        vae_sd_to_diffusers({**original, "encoder.mid.attn_2.q.weight": torch.zeros(1)})


def test_detect_vae_config_recovers_the_architecture(vae):
    model, weights = vae
    detected = detect_vae_config(weights)
    assert detected["block_out_channels"] == list(model.config.block_out_channels)
    for name in ("layers_per_block", "latent_channels", "in_channels", "out_channels", "mid_block_add_attention"):
        assert detected[name] == model.config[name], name
    assert detected["down_block_types"] == list(model.config.down_block_types)
    assert detected["up_block_types"] == list(model.config.up_block_types)


def test_full_kl_f8_vae_key_set_maps():
    with torch.device("meta"):
        model = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
    weights = model.state_dict()
    original = vae_diffusers_to_sd(weights, model.config)
    assert len(original) == len(weights) == 248
    for key in (
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "decoder.up.3.block.2.conv2.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.3.upsample.conv.weight",
        "encoder.mid.attn_1.q.weight",
        "decoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in original, key
    assert original["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sorted(vae_sd_to_diffusers(original)) == sorted(weights)


# ----------------------------------------------------------------------------- CLIP text encoder


def test_installed_transformers_layout_is_detected(clip):
    model, _ = clip
    assert installed_clip_uses_text_model_prefix() == any(k.startswith("text_model.") for k in model.state_dict())


def test_text_maps_match_diffusers_converter_and_load(clip):
    model, weights = clip
    original = text_transformers_to_sd(weights)
    assert all(key.startswith("text_model.") for key in original)
    checkpoint = {f"cond_stage_model.transformer.{k}": v for k, v in original.items()}
    # an old file also carries the position_ids buffer, which must be dropped
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    reference = convert_ldm_clip_checkpoint(checkpoint)
    ours = text_sd_to_transformers(split_sd_checkpoint(checkpoint)["text_encoder"])
    prefix = "text_model." if installed_clip_uses_text_model_prefix() else ""
    expected = {prefix + k.removeprefix("text_model."): v for k, v in reference.items() if "position_ids" not in k}
    assert_same_tensors(ours, expected)
    assert_same_tensors(ours, weights)
    model.load_state_dict(ours, strict=True)


def test_text_accepts_and_writes_both_transformers_layouts(clip):
    _, weights = clip
    body = {k.removeprefix("text_model."): v for k, v in weights.items()}
    prefixed = {f"text_model.{k}": v for k, v in body.items()}
    for layout in (body, prefixed):
        original = text_transformers_to_sd(layout)
        assert_same_tensors(original, prefixed)
        assert_same_tensors(text_sd_to_transformers(original, text_model_prefix=True), prefixed)
        assert_same_tensors(text_sd_to_transformers(original, text_model_prefix=False), body)


def test_text_with_unknown_keys_is_refused(clip):
    _, weights = clip
    with pytest.raises(BundleError, match="text_projection.weight"):
        text_transformers_to_sd({**weights, "text_projection.weight": torch.zeros(2, 2)})


# ----------------------------------------------------------------------------- whole checkpoints and EMA


@pytest.fixture(scope="module")
def sd_checkpoint():
    """A small original-layout checkpoint: U-Net, VAE, text encoder, schedule buffers, EMA."""
    model = UNet2DConditionModel(**UNET_CONFIGS["two_levels"])
    unet_sd = unet_diffusers_to_sd(random_weights(model, seed=3), model.config)
    vae_model = AutoencoderKL(
        **VAE_CONFIGS["two_levels"],
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    # LitEma's names: model.diffusion_model.input_blocks.0.0.weight -> model_ema.diffusion_modelinput_blocks00weight
    ema = {f"model_ema.{('diffusion_model.' + k).replace('.', '')}": v + 1 for k, v in unet_sd.items()}
    other = {
        "betas": torch.rand(10),
        "alphas_cumprod": torch.rand(10),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(7),
        **ema,
    }
    parts = {
        "unet": unet_sd,
        "vae": vae_diffusers_to_sd(random_weights(vae_model, seed=4)),
        "text_encoder": {
            "text_model.embeddings.token_embedding.weight": torch.rand(4, 2),
            "text_model.embeddings.position_ids": torch.arange(3)[None],
        },
        "other": other,
    }
    return join_sd_checkpoint(parts), parts


def test_split_and_join_are_inverse(sd_checkpoint):
    checkpoint, parts = sd_checkpoint
    assert "model.diffusion_model.input_blocks.0.0.weight" in checkpoint
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in checkpoint
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in checkpoint
    split = split_sd_checkpoint(checkpoint)
    assert sorted(split) == ["other", "text_encoder", "unet", "vae"]
    for name, part in parts.items():
        assert_same_tensors(split[name], part)
    assert_same_tensors(join_sd_checkpoint(split), checkpoint)


def test_extract_ema_unet_restores_names(sd_checkpoint):
    checkpoint, parts = sd_checkpoint
    ema = extract_ema_unet(checkpoint)
    assert ema is not None
    assert_same_tensors(ema, {k: v + 1 for k, v in parts["unet"].items()})
    # an EMA-only file is named from the key list the caller knows
    ema_only = {k: v for k, v in checkpoint.items() if not k.startswith("model.diffusion_model.")}
    assert_same_tensors(extract_ema_unet(ema_only, unet_keys=parts["unet"]), ema)
    with pytest.raises(BundleError, match="no model.diffusion_model"):
        extract_ema_unet(ema_only)


def test_extract_ema_unet_without_ema_or_with_partial_ema(sd_checkpoint):
    checkpoint, _ = sd_checkpoint
    without = {k: v for k, v in checkpoint.items() if not k.startswith("model_ema.")}
    assert extract_ema_unet(without) is None
    partial = dict(checkpoint)
    del partial["model_ema.diffusion_modelout2weight"]
    with pytest.raises(BundleError, match=r"EMA U-Net weights do not fit the model: 1 missing \(out.2.weight\)"):
        extract_ema_unet(partial)


def test_check_keys_reports_names_counts_and_shapes():
    expected = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    check_keys({"a.weight": torch.ones(2, 3), "b.weight": torch.ones(4)}, expected, "Thing")
    check_keys({"a.weight": torch.ones(5)}, ["a.weight"], "Thing")  # names only: no shape check
    with pytest.raises(BundleError) as error:
        check_keys({"a.weight": torch.ones(3, 2), "c.bias": torch.ones(1)}, expected, "Thing")
    message = str(error.value)
    assert "1 missing (b.weight)" in message and "1 unexpected (c.bias)" in message
    assert "a.weight (3, 2) vs (2, 3)" in message


def test_prediction_type_defaults_to_epsilon_and_can_be_overridden():
    assert detect_prediction_type() == "epsilon"
    assert detect_prediction_type({"cross_attention_dim": 1024}, override="v_prediction") == "v_prediction"
    with pytest.raises(UsageError, match="v-pred"):
        detect_prediction_type(override="v-pred")
