"""A photographer's path, end to end on tiny pieces: check a mixed-aspect folder's buckets, encode
with --buckets, train a tiny U-Net with Adafactor + cosine on shuffled tag captions, resume exactly,
preview their own captions at the most common (portrait) shape, sample portrait and landscape."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import load_bundle, write_bundle
from ldm_cli.cli import app
from ldm_cli.config import to_dict
from ldm_cli.diffusion.train import dataset_prompts
from ldm_cli.latents.dataset import LatentDataset
from tests.conftest import TINY_UNET_OVERRIDES
from tests.photos import BUCKET_OVERRIDES

TRAIN = [
    "train=diffusion_tiny", "train.batch_size=2", "train.precision=fp32", "train.optimizer=adafactor", "train.lr_schedule=cosine",
    "train.lr_schedule_steps=4", "train.warmup_steps=1", "train.checkpoint_every=2", "train.image_every=4", "train.eval_every=4",
    "train.eval_batches=1", "objective.shuffle_tags=true", "objective.keep_tokens=1", "objective.tag_dropout=0.2",
    "objective.validation_steps=2", "objective.validation_loss_timesteps=[500]",
]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.slow
def test_photo_folder_to_portrait_and_landscape_samples(photos_dir, tmp_path):
    # 1. the bucket histogram, before anything is encoded
    report = cli("data", "check", photos_dir, "--buckets", *BUCKET_OVERRIDES)
    assert "buckets: 3" in report and "24x40 (0.60): 5 images" in report and "40x24 (1.67): 4 images" in report

    # 2. encode with buckets (a random tiny autoencoder: 2x downsampling)
    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(0)
    meta = {"autoencoder": to_dict(config), "latent_scale": 0.5, "latent_shift": 0.0, "resolution": 32}
    write_bundle(tmp_path / "vae", "autoencoder", {"autoencoder": AutoencoderKL(config).state_dict()}, meta)
    summary = cli("encode", "--vae", tmp_path / "vae", "--data", photos_dir, "--out", tmp_path / "latents", "--buckets",
                  *BUCKET_OVERRIDES, "text_encoder=tiny", "text_encoder.max_length=16")
    assert "12 items" in summary and "32x32 (1.00): 3 images" in summary

    # 3. train 4 steps straight, and 2 + resume to 4: the same weights
    common = ["--latents", tmp_path / "latents", "--device", "cpu"]
    cli("train-diffusion", *common, "--out", tmp_path / "straight", *TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=4")
    cli("train-diffusion", *common, "--out", tmp_path / "resumed", *TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=2")
    # the same command line with more steps and --resume continues from the step-2 checkpoint
    resumed_output = cli("train-diffusion", *common, "--out", tmp_path / "resumed", *TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=4", "--resume")
    assert "(step 2)" in resumed_output
    straight = load_bundle(tmp_path / "straight", kind="latent-diffusion").tensors("unet")
    resumed = load_bundle(tmp_path / "resumed", kind="latent-diffusion").tensors("unet")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)

    # 4. previews: the folder's own captions, at the portrait bucket (24x40 pixels, shown 4x)
    prompts = dataset_prompts(LatentDataset(tmp_path / "latents"), seed=0)
    captions = {path.read_text() for path in photos_dir.glob("*.txt")}
    assert 1 <= len(prompts) <= 4 and set(prompts) <= captions
    preview = Image.open(tmp_path / "straight" / "images" / "step_0000004.png")
    assert preview.height == 4 * (len(prompts) * (40 + 2) + 2)

    # 5. portrait and landscape samples
    for height, width in ((40, 24), (24, 40)):
        out = tmp_path / f"samples_{width}x{height}"
        cli("sample", "--model", tmp_path / "straight", "--prompt", "photo of coffee, portrait", "--steps", "2",
            "--height", height, "--width", width, "--device", "cpu", "--out", out)
        (image,) = out.glob("*.png")
        assert Image.open(image).size == (width, height)


@pytest.mark.slow
def test_resume_with_only_more_steps_uses_the_runs_own_text_encoder(photos_dir, tmp_path):
    # the run uses text_encoder=tiny; `--resume train.max_steps=N` alone must not load the default encoder
    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    meta = {"autoencoder": to_dict(config), "latent_scale": 0.5, "latent_shift": 0.0, "resolution": 32}
    write_bundle(tmp_path / "vae", "autoencoder", {"autoencoder": AutoencoderKL(config).state_dict()}, meta)
    cli("encode", "--vae", tmp_path / "vae", "--data", photos_dir, "--out", tmp_path / "latents", "--buckets",
        *BUCKET_OVERRIDES, "text_encoder=tiny", "text_encoder.max_length=16")
    common = ["--latents", tmp_path / "latents", "--device", "cpu", "--out", tmp_path / "run"]
    cli("train-diffusion", *common, *TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=2")
    assert "(step 2)" in cli("train-diffusion", *common, "--resume", "train.max_steps=3")
    assert (tmp_path / "run" / "bundle").is_dir()
