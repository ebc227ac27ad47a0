from __future__ import annotations

import pytest

from ldm_cli.config import TrainVaeConfig, apply_overrides, load_config, to_dict, from_dict
from ldm_cli.errors import ConfigError


def test_compose_tiny_preset_types():
    config = load_config("train_vae", ["autoencoder=tiny", "train.max_steps=20000", "data.resolution=64"])
    assert isinstance(config, TrainVaeConfig)
    assert config.autoencoder.block_out_channels == [32, 64, 64]
    assert config.train.max_steps == 20000 and config.data.resolution == 64
    assert config.train.adam_betas == [0.5, 0.9]


def test_kl_f8_is_the_default_and_matches_sd():
    config = load_config("train_vae")
    assert config.autoencoder.block_out_channels == [128, 256, 512, 512]
    assert config.autoencoder.layers_per_block == 2 and config.autoencoder.latent_channels == 4
    assert config.loss.kl_weight == 1e-6


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("autoencoder=nope", "Could not find 'autoencoder/nope'"),
        ("train.bogus=1", "train.bogus"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=-5", "train.max_steps: expected a positive integer"),
        ("train.precision=fp64", "train.precision"),
        ("train.max_steps==", "Error parsing override"),
        ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes: expected a positive number"),
    ],
)
def test_bad_overrides_are_one_line_config_errors(override, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config("train_vae", [override])
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_distributed_and_determinism_settings_compose():
    config = load_config("train_diffusion", ["train.dist_timeout_minutes=240", "train.deterministic=true"])
    assert config.train.dist_timeout_minutes == 240 and config.train.deterministic
    assert load_config("encode", ["dist_timeout_minutes=30"]).dist_timeout_minutes == 30
    with pytest.raises(ConfigError, match="dist_timeout_minutes: expected a positive number"):
        load_config("encode", ["dist_timeout_minutes=-1"])


def test_every_primary_config_composes():
    for name in ("train_vae", "train_diffusion", "encode", "sample"):
        assert load_config(name) is not None


def test_user_config_dir_adds_a_group_option(tmp_path):
    (tmp_path / "autoencoder").mkdir()
    (tmp_path / "autoencoder" / "mine.yaml").write_text("block_out_channels: [16, 32]\nnorm_num_groups: 8\n")
    config = load_config("train_vae", ["autoencoder=mine"], config_dir=tmp_path)
    assert config.autoencoder.block_out_channels == [16, 32]
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("train_vae", [], config_dir=tmp_path / "missing")


def test_overrides_on_a_saved_config_and_round_trip():
    config = load_config("train_vae", ["autoencoder=tiny"])
    again = from_dict(to_dict(config), TrainVaeConfig)
    assert again == config
    longer = apply_overrides(config, ["train.max_steps=7"])
    assert longer.train.max_steps == 7 and longer.autoencoder == config.autoencoder
    with pytest.raises(ConfigError):
        apply_overrides(config, ["train.nope=1"])
