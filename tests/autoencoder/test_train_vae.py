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
    assert load_bundle(tuned).meta["latent_space_hash"] == load_bundle(base).meta["latent_space_hash"]


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


def _one_batch(shapes_dir, count=4):
    from ldm_cli.autoencoder.train import collate_images
    from ldm_cli.data.images import ImageFolderDataset

    dataset = ImageFolderDataset(shapes_dir, 16, split="all")
    return dataset, collate_images([dataset[i] for i in range(count)])


def test_discriminator_gradient_is_the_hinge_loss_gradient_alone(shapes_dir):
    """The generator's GAN term must not leak into the discriminator's gradient."""
    import copy

    from ldm_cli.autoencoder.loss import hinge_d_loss
    from ldm_cli.autoencoder.train import AutoencoderTrainer

    config, _ = tiny_config(shapes_dir, 1, ["loss.disc_start=0"])
    dataset, batch = _one_batch(shapes_dir)
    trainer = AutoencoderTrainer(config, dataset, torch.device("cpu"))
    discriminator = trainer.loss.discriminator
    before = copy.deepcopy(discriminator)
    inputs = []  # what D sees: reconstructions (generator pass), then real images and reconstructions
    discriminator.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    seen = {}
    trainer.opt_disc.register_step_pre_hook(
        lambda optimizer, args, kwargs: seen.update({n: p.grad.clone() for n, p in discriminator.named_parameters()})
    )
    trainer.train_step([batch], step=0)

    real, fake = inputs[1], inputs[2]
    torch.testing.assert_close(fake, inputs[0])
    loss = config.loss.disc_factor * hinge_d_loss(before(real), before(fake))
    expected = dict(zip([n for n, _ in before.named_parameters()], torch.autograd.grad(loss, list(before.parameters()))))
    assert seen.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.requires_grad for p in discriminator.parameters())  # unfrozen for its own step


def test_train_step_metrics_stay_on_the_device(shapes_dir):
    """Reading a GPU scalar blocks until the GPU is idle: the step leaves that to the loop's log_every."""
    from ldm_cli.autoencoder.train import AutoencoderTrainer

    config, _ = tiny_config(shapes_dir, 1, ["loss.disc_start=0"])
    dataset, batch = _one_batch(shapes_dir)
    metrics = AutoencoderTrainer(config, dataset, torch.device("cpu")).train_step([batch], step=0)
    assert {"loss", "rec_loss", "disc_loss", "g_loss"} <= metrics.keys()
    assert all(isinstance(value, torch.Tensor) and value.dim() == 0 for value in metrics.values())


def torchrun_train_vae(out, overrides):
    """`ldm train-vae` in two CPU processes under torchrun."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        "-m", "ldm_cli.cli", "train-vae", "--out", str(out), "--device", "cpu", *overrides,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(shapes_dir, tmp_path):
    # GAN on from the first step; a discriminator without BatchNorm, whose batch statistics are per
    # process on the CPU (GPUs synchronise them)
    gan = ["loss.disc_start=0", "loss.disc.num_layers=0", "train.ema_decay=0.5", "train.max_steps=2", "train.checkpoint_every=1"]
    single, overrides = tiny_config(shapes_dir, 2, [*gan, "train.batch_size=4"])
    train_autoencoder(single, tmp_path / "single", overrides)
    _, ddp_overrides = tiny_config(shapes_dir, 2, [*gan, "train.batch_size=2"])
    torchrun_train_vae(tmp_path / "ddp", ddp_overrides)

    single_weights, ddp_weights = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert single_weights.keys() == ddp_weights.keys()
    for key in single_weights:
        # the key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys),
        # so Adam's m/sqrt(v) turns summation-order noise in it into steps of up to lr
        if not key.endswith("to_k.bias"):
            torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    with open(tmp_path / "ddp" / "metrics.csv") as handle:
        rows = [(row["step"], row["name"]) for row in csv.DictReader(handle)]
    assert len(rows) == len(set(rows)) and ("2", "train/disc_loss") in rows  # one writer: rank 0
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
