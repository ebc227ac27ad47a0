"""End-to-end `train-vae` behaviour on a tiny model: resume equivalence, run-dir safety, bundles."""

from __future__ import annotations

import csv

import pytest
import torch
from typer.testing import CliRunner

from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.autoencoder.train import train_autoencoder
from ldm_cli.bundle import load_bundle
from ldm_cli.cli import app
from ldm_cli.config import load_config
from ldm_cli.errors import ConfigError, RunDirError
from ldm_cli.training.loop import TrainingInterrupted
from tests.conftest import TINY_VAE_OVERRIDES


def tiny_config(shapes_dir, steps, extra=()):
    overrides = [f"data.path={shapes_dir}", f"train.max_steps={steps}", *TINY_VAE_OVERRIDES, *extra]
    return load_config("train_vae", overrides), overrides


def final_weights(run):
    return load_bundle(run, kind="autoencoder").tensors("autoencoder")


def test_n_steps_resume_n_steps_equals_2n_steps(shapes_dir, tmp_path):
    config, overrides = tiny_config(shapes_dir, 4)
    train_autoencoder(config, tmp_path / "straight", overrides)

    half, half_overrides = tiny_config(shapes_dir, 2)
    train_autoencoder(half, tmp_path / "resumed", half_overrides)
    # extend the finished 2-step run to 4 steps: it resumes from its checkpoint
    train_autoencoder(half, tmp_path / "resumed", ["train.max_steps=4"], resume=True)

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_run_outputs_bundle_metrics_and_images(shapes_dir, tmp_path):
    config, overrides = tiny_config(shapes_dir, 4, ["train.ema_decay=0.9"])
    bundle_path = train_autoencoder(config, tmp_path / "run", overrides)
    bundle = load_bundle(bundle_path)
    assert bundle.kind == "autoencoder"
    assert bundle.meta["resolution"] == 16 and bundle.meta["latent_scale"] > 0
    assert set(bundle.meta["holdout_metrics"]) == {"psnr", "ssim"}
    loaded = load_autoencoder(tmp_path / "run")
    assert loaded.model.config.block_out_channels == [8, 16]
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = {row["name"] for row in rows}
    assert {"train/loss", "train/disc_loss", "eval/psnr"} <= names
    assert max(int(row["step"]) for row in rows) == 4
    assert (tmp_path / "run" / "images" / "step_0000004.png").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_existing_directories_are_never_overwritten(shapes_dir, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    config, overrides = tiny_config(shapes_dir, 2)
    with pytest.raises(RunDirError, match="is not an ldm run"):
        train_autoencoder(config, tmp_path / "other", overrides)
    train_autoencoder(config, tmp_path / "run", overrides)
    with pytest.raises(RunDirError, match="is complete"):
        train_autoencoder(config, tmp_path / "run", overrides)
    different, _ = tiny_config(shapes_dir, 2, ["autoencoder.layers_per_block=2"])
    with pytest.raises(RunDirError, match="autoencoder.layers_per_block: saved 1, now 2"):
        train_autoencoder(different, tmp_path / "run", overrides)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_interrupt_saves_a_checkpoint_and_rerun_resumes(shapes_dir, tmp_path, monkeypatch):
    import ldm_cli.autoencoder.train as train_module

    config, overrides = tiny_config(shapes_dir, 4, ["train.checkpoint_every=100"])
    original = train_module.AutoencoderTrainer.train_step
    calls = {"n": 0}

    def interrupt_on_third(self, batches, step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batches, step)

    monkeypatch.setattr(train_module.AutoencoderTrainer, "train_step", interrupt_on_third)
    result = CliRunner().invoke(app, ["train-vae", "--out", str(tmp_path / "run"), *overrides])
    assert isinstance(result.exception, TrainingInterrupted) and result.exception.exit_code == 130
    assert "interrupted at step 2" in str(result.exception)
    assert (tmp_path / "run" / "checkpoints" / "step_0000002").is_dir()
    monkeypatch.setattr(train_module.AutoencoderTrainer, "train_step", original)
    train_autoencoder(config, tmp_path / "run", overrides)  # same command again: resumes
    straight, _ = tiny_config(shapes_dir, 4)
    train_autoencoder(straight, tmp_path / "straight", overrides)
    for key, value in final_weights(tmp_path / "straight").items():
        torch.testing.assert_close(final_weights(tmp_path / "run")[key], value, rtol=0, atol=1e-6)


def test_posterior_logvar_init_sets_the_starting_noise():
    from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL

    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, posterior_logvar_init=-6.0)
    model = AutoencoderKL(config)
    assert torch.all(model.quant_conv.bias[4:] == -6.0)
    posterior = model.encode(torch.zeros(1, 3, 16, 16))
    assert posterior.logvar.mean() < -4  # the weights add little at init


def test_init_from_with_decoder_only_keeps_the_encoder_and_its_latent_space(shapes_dir, tmp_path):
    config, overrides = tiny_config(shapes_dir, 2)
    base = train_autoencoder(config, tmp_path / "base", overrides)
    # the default autoencoder preset is kl_f8: the architecture follows the base instead
    extra = ["data.resolution=16", "train=vae_tiny", "train.batch_size=4", "train.precision=fp32", "train.lr=1e-3",
             "loss=vae_tiny", "loss.perceptual_weight=0", "loss.disc.base_channels=8", "loss.decoder_only=true",
             "train.max_steps=2", "train.checkpoint_every=2", "train.eval_batches=1"]
    config = load_config("train_vae", [f"data.path={shapes_dir}", *extra])
    tuned = train_autoencoder(config, tmp_path / "tuned", extra, init_from=tmp_path / "base")
    before, after = load_bundle(base).tensors("autoencoder"), load_bundle(tuned).tensors("autoencoder")
    frozen = [key for key in before if key.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[key], after[key]) for key in frozen)
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("decoder."))
    assert load_bundle(tuned).meta["latent_scale"] == load_bundle(base).meta["latent_scale"]


def test_init_from_starts_at_the_base_weights(shapes_dir, tmp_path):
    config, overrides = tiny_config(shapes_dir, 2)
    base = train_autoencoder(config, tmp_path / "base", overrides)
    extra = [*overrides[1:], "train.lr=1e-6", "train.max_steps=1"]  # one tiny step: the weights barely move
    config = load_config("train_vae", [f"data.path={shapes_dir}", *extra])
    tuned = train_autoencoder(config, tmp_path / "tuned", extra, init_from=base)
    before, after = load_bundle(base).tensors("autoencoder"), load_bundle(tuned).tensors("autoencoder")
    assert max(float((before[key] - after[key]).abs().max()) for key in before) < 1e-4


def test_decoder_only_needs_a_model_to_start_from(shapes_dir, tmp_path):
    config, overrides = tiny_config(shapes_dir, 2, ["loss.decoder_only=true"])
    with pytest.raises(ConfigError, match="pass --init-from MODEL"):
        train_autoencoder(config, tmp_path / "run", overrides)
