"""`ldm train-lora` on tiny pieces: adapters only, resume equivalence, the base untouched, the file it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_cli.adapters.files import KOHYA, read_lora_file
from ldm_cli.adapters.train import train_lora
from ldm_cli.bundle import file_sha256, load_bundle
from ldm_cli.config import load_config
from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.latents.encode import encode_dataset
from tests.sampling.helpers import write_tiny_latent_diffusion

TRAIN = [
    "train=diffusion_tiny", "train.batch_size=4", "train.precision=fp32", "train.log_every=1", "train.eval_every=100",
    "train.eval_batches=1", "train.image_every=100", "train.checkpoint_every=2", "train.warmup_steps=2", "train.lr=1e-2",
    "objective.validation_prompts=[a red circle]", "objective.validation_steps=2", "objective.validation_loss_timesteps=[500]",
    "lora.rank=2", "lora.alpha=4",
]


@pytest.fixture(scope="module")
def base_and_latents(shapes_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora-train")
    base = write_tiny_latent_diffusion(root / "base")
    encode_config = load_config("encode", [f"data.path={shapes_dir}", "text_encoder=tiny", "text_encoder.max_length=16"])
    encode_dataset(base / "autoencoder", encode_config, root / "latents", cache_text=False, device_name="cpu")
    return base, root / "latents"


def run(base: Path, latents: Path, out: Path, overrides: list[str], resume: bool = False) -> Path:
    config = load_config("train_lora", TRAIN + overrides)
    return train_lora(config, latents, base, out, TRAIN + overrides, resume=resume, device_name="cpu")


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_and_base_is_untouched(base_and_latents, tmp_path):
    base, latents = base_and_latents
    hashes = {path.name: file_sha256(path) for path in base.glob("*.safetensors")}
    straight = read_lora_file(run(base, latents, tmp_path / "straight", ["train.max_steps=4", "lora.targets=all"]))
    run(base, latents, tmp_path / "halves", ["train.max_steps=2", "lora.targets=all"])
    halves = read_lora_file(run(base, latents, tmp_path / "halves", ["train.max_steps=4", "lora.targets=all"], resume=True))
    assert straight.layout == KOHYA and sorted(straight.layers) == sorted(halves.layers)
    assert any(name.endswith("proj_in") for name in straight.layers) and any(name.endswith("conv1") for name in straight.layers)
    for name, layer in straight.layers.items():
        torch.testing.assert_close(halves.layers[name].down, layer.down, rtol=0, atol=0)
        torch.testing.assert_close(halves.layers[name].up, layer.up, rtol=0, atol=0)
    assert any(layer.up.abs().max() > 0 for layer in straight.layers.values())  # it learned something
    assert {path.name: file_sha256(path) for path in base.glob("*.safetensors")} == hashes
    checkpoint_tensors = sum(1 for _ in (tmp_path / "straight" / "checkpoints").rglob("*"))
    assert checkpoint_tensors > 0


@pytest.mark.slow
def test_lora_file_metadata_and_sampling_with_it(base_and_latents, tmp_path):
    base, latents = base_and_latents
    path = run(base, latents, tmp_path / "run", ["train.max_steps=2"])
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_new_sd_model_hash"] == load_bundle(base).content_hash and meta["ss_steps"] == "2"
    keys = load_file(str(path))
    assert all(key.startswith("lora_unet_") for key in keys)
    assert any(key.endswith("attn2_to_k.lora_down.weight") for key in keys)
    plain = load_latent_diffusion(base)
    merged = load_latent_diffusion(base, loras=[(read_lora_file(path), 1.0)])
    changed = [k for k, v in plain.unet.state_dict().items() if not torch.equal(v, merged.unet.state_dict()[k])]
    assert changed and all("attn" in key for key in changed)


def test_init_from_continues_a_lora_file_with_its_own_alpha(tmp_path):
    from ldm_cli.adapters.config import LoraConfig
    from ldm_cli.adapters.inject import base_state, inject_lora, load_lora_layers, lora_layers
    from ldm_cli.adapters.kohya import write_kohya_file
    from ldm_cli.adapters.targets import ModelTargets
    from ldm_cli.diffusion.unet import UNet
    from tests.sampling.helpers import tiny_unet_config

    unet = UNet(tiny_unet_config())
    inject_lora(unet, LoraConfig(rank=2, targets="all"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    layers = lora_layers(unet, alpha=2.0)
    for layer in layers.values():
        layer.alpha = 0.5  # a file whose alpha differs from lora.alpha
    write_kohya_file(layers, tmp_path / "start.safetensors", {})
    fresh = UNet(tiny_unet_config())
    inject_lora(fresh, LoraConfig(rank=2, alpha=4.0, targets="all"))
    load_lora_layers(fresh, ModelTargets.of(base_state(fresh), None).resolve(read_lora_file(tmp_path / "start.safetensors")))
    continued = lora_layers(fresh, alpha=4.0)
    assert sorted(continued) == sorted(layers)
    for name, layer in layers.items():
        shape = fresh.get_submodule(name.split(".", 1)[1]).get_base_layer().weight.shape
        torch.testing.assert_close(continued[name].delta(shape), layer.delta(shape), rtol=1e-5, atol=1e-6)
