"""The GPU path, tiny: every stage in bf16 and fp16, every sampler, compile=true, exact resume with
EMA, and torchrun on two GPUs. Marked `cuda` (skipped without a GPU); `scripts/gpu_check.sh` runs
them. `LDM_TEST_DEVICE=cpu pytest -m cuda` walks the same code on the CPU (in fp32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli.autoencoder.train import train_autoencoder
from ldm_cli.bundle import load_bundle
from ldm_cli.cli import app
from ldm_cli.config import load_config
from ldm_cli.diffusion.train import train_unet
from ldm_cli.latents.encode import encode_dataset
from ldm_cli.sampling.samplers import SAMPLERS
from tests.conftest import TINY_UNET_OVERRIDES, TINY_VAE_OVERRIDES
from tests.sampling.helpers import write_tiny_latent_diffusion

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("LDM_TEST_DEVICE", "cuda")
PRECISIONS = ["bf16", "fp16"] if DEVICE == "cuda" else ["fp32"]  # the CPU dry run checks the logic only

TRAIN = [
    "train=diffusion_tiny", "train.batch_size=4", "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
    "train.image_every=4", "train.checkpoint_every=2", "objective.validation_prompts=[a red circle]",
    "objective.validation_steps=3", "objective.validation_loss_timesteps=[500]",
]


def finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(value.float()).all() for value in tensors.values())


def invoke(*args: object) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def pngs(folder: Path) -> list[np.ndarray]:
    images = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_stage_runs_on_the_gpu(precision, shapes_dir, tmp_path):
    # 1. train-vae
    vae_overrides = [f"data.path={shapes_dir}", "train.max_steps=2", *TINY_VAE_OVERRIDES, f"train.precision={precision}",
                     "train.ema_decay=0.5"]
    train_autoencoder(load_config("train_vae", vae_overrides), tmp_path / "vae", vae_overrides, device_name=DEVICE)
    assert finite(load_bundle(tmp_path / "vae", kind="autoencoder").tensors("autoencoder"))
    # 2. encode (with cached text)
    encode_config = load_config("encode", [f"data.path={shapes_dir}", "text_encoder=tiny", "text_encoder.max_length=16",
                                           f"precision={precision}"])
    index = encode_dataset(tmp_path / "vae", encode_config, tmp_path / "latents", cache_text=True, device_name=DEVICE)
    assert index["complete"] and index["count"] == 24
    # 3. train-diffusion (EMA on)
    overrides = [*TINY_UNET_OVERRIDES, *TRAIN, "train.max_steps=4", f"train.precision={precision}", "train.ema_decay=0.9"]
    train_unet(load_config("train_diffusion", overrides), tmp_path / "latents", tmp_path / "unet", overrides, device_name=DEVICE)
    assert finite(load_bundle(tmp_path / "unet", kind="latent-diffusion").tensors("unet"))
    # 4. sample, 5. img2img
    invoke("sample", "--model", tmp_path / "unet", "--prompt", "a red circle", "-n", "2", "--steps", "4",
           "--precision", precision, "--device", DEVICE, "--out", tmp_path / "samples")
    assert [image.shape for image in pngs(tmp_path / "samples")] == [(16, 16, 3)] * 2
    invoke("img2img", "--model", tmp_path / "unet", "--init", next(shapes_dir.glob("**/*.png")), "--prompt", "a blue square",
           "--steps", "4", "--precision", precision, "--device", DEVICE, "--out", tmp_path / "img2img")
    assert len(pngs(tmp_path / "img2img")) == 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_latent_diffusion(tmp_path_factory.mktemp("cuda") / "model")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_samples_on_the_gpu(sampler, model_dir, tmp_path):
    invoke("sample", "--model", model_dir, "--prompt", "a red circle", "--steps", "4", "--sampler", sampler,
           "--precision", PRECISIONS[0], "--device", DEVICE, "--out", tmp_path)
    (image,) = pngs(tmp_path)
    assert image.shape == (16, 16, 3)


def test_compiled_sampling_matches_eager(model_dir, tmp_path):
    common = ["--model", model_dir, "--prompt", "a red circle", "--steps", "4", "--precision", "fp32", "--device", DEVICE]
    invoke("sample", *common, "--out", tmp_path / "eager")
    invoke("sample", *common, "--out", tmp_path / "compiled", "compile=true")
    (eager,), (compiled,) = pngs(tmp_path / "eager"), pngs(tmp_path / "compiled")
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 2  # kernels differ, pixels barely


def test_resume_with_ema_is_exact_with_deterministic_kernels(shapes_dir, tmp_path):
    """A resumed run's EMA shadow goes back to the GPU (checkpoints are read on the CPU), and with
    train.deterministic=true N + resume + N steps equal 2N bitwise."""
    encode_config = load_config("encode", [f"data.path={shapes_dir}", "text_encoder=tiny", "text_encoder.max_length=16"])
    model = write_tiny_latent_diffusion(tmp_path / "model")  # its autoencoder encodes
    encode_dataset(model, encode_config, tmp_path / "latents", cache_text=True, device_name=DEVICE)
    overrides = [*TINY_UNET_OVERRIDES, *TRAIN, "train.precision=fp32", "train.ema_decay=0.9", "train.deterministic=true"]

    def run(out: Path, steps: int, resume: bool = False) -> None:
        extra = [f"train.max_steps={steps}"]
        config = load_config("train_diffusion", [*overrides, *extra])
        train_unet(config, tmp_path / "latents", out, extra if resume else [*overrides, *extra], resume=resume, device_name=DEVICE)

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4, resume=True)
    straight = load_bundle(tmp_path / "straight", kind="latent-diffusion").tensors("unet")
    resumed = load_bundle(tmp_path / "resumed", kind="latent-diffusion").tensors("unet")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_trains_on_two_gpus(shapes_dir, tmp_path):
    overrides = [f"data.path={shapes_dir}", "train.max_steps=2", *TINY_VAE_OVERRIDES, "train.batch_size=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldm_cli.cli", "train-vae", "--out", str(tmp_path / "vae"), "--device", DEVICE, *overrides]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finite(load_bundle(tmp_path / "vae", kind="autoencoder").tensors("autoencoder"))
