"""`ldm train-lora` on tiny pieces: adapters only, resume equivalence, the base untouched, the file it writes;
with `lora.train_text_encoder`, the text encoder's adapters too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_cli.adapters.files import KOHYA, read_lora_file
from ldm_cli.adapters.train import train_lora
from ldm_cli.bundle import file_sha256, load_bundle
from ldm_cli.config import load_config
from ldm_cli.errors import ConfigError, IncompatibleError
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


TEXT = ["lora.train_text_encoder=true"]


def file_layers(path: Path, part: str) -> dict:
    return {name: layer for name, layer in read_lora_file(path).layers.items() if name.startswith(part)}


@pytest.mark.slow
def test_text_encoder_adapters_resume_exactly_and_leave_the_base_untouched(base_and_latents, tmp_path):
    base, latents = base_and_latents
    hashes = {path.name: file_sha256(path) for path in base.rglob("*.safetensors")}
    common = [*TEXT, "lora.text_encoder_lr=5e-3", "train.ema_decay=0.5"]  # the file ships both EMAs
    straight = run(base, latents, tmp_path / "straight", [*common, "train.max_steps=4"])
    run(base, latents, tmp_path / "halves", [*common, "train.max_steps=2"])
    overrides = [*common, "train.max_steps=4"]
    halves = run(base, latents, tmp_path / "halves", overrides, resume=True)
    layers, resumed = read_lora_file(straight).layers, read_lora_file(halves).layers
    text = [name for name in layers if name.startswith("lora_te_text_model_encoder_layers_")]
    # the attention projections of both CLIP layers (lora.targets=attention), beside the U-Net's
    assert len(text) == 8 and {name.rsplit("_", 2)[-2] for name in text} == {"q", "k", "v", "out"}
    assert any(name.startswith("lora_unet_") for name in layers) and sorted(resumed) == sorted(layers)
    for name, layer in layers.items():
        torch.testing.assert_close(resumed[name].down, layer.down, rtol=0, atol=0)
        torch.testing.assert_close(resumed[name].up, layer.up, rtol=0, atol=0)
    assert all(layers[name].up.abs().max() > 0 for name in text)  # the text encoder learned
    assert {path.name: file_sha256(path) for path in base.rglob("*.safetensors")} == hashes
    with safe_open(str(straight), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_text_encoder_lr"] == "0.005" and meta["ss_unet_lr"] == "0.01" and meta["ldm_train_text_encoder"] == "True"


@pytest.mark.slow
def test_each_adapter_set_takes_its_own_learning_rate(base_and_latents, tmp_path):
    """AdamW's first step moves every parameter with a gradient by lr (m / sqrt(v) = ±1): lora_up starts at 0,
    so after one step its largest element is the learning rate of its group."""
    base, latents = base_and_latents
    path = run(base, latents, tmp_path / "run", [*TEXT, "lora.text_encoder_lr=3e-3", "train.max_steps=1", "train.warmup_steps=0"])
    unet_up = max(float(layer.up.abs().max()) for layer in file_layers(path, "lora_unet_").values())
    text_up = max(float(layer.up.abs().max()) for layer in file_layers(path, "lora_te_").values())
    assert unet_up == pytest.approx(1e-2, rel=1e-3) and text_up == pytest.approx(3e-3, rel=1e-3)
    unet_only = run(base, latents, tmp_path / "unet-only", ["train.max_steps=1"])
    assert not file_layers(unet_only, "lora_te_")
    with safe_open(str(unet_only), framework="pt") as handle:
        assert handle.metadata()["ss_text_encoder_lr"] == "0.0"


def test_cached_text_is_refused_when_the_text_encoder_is_trained(shapes_dir, tmp_path):
    base = write_tiny_latent_diffusion(tmp_path / "base")
    encode_config = load_config("encode", [f"data.path={shapes_dir}", "text_encoder=tiny", "text_encoder.max_length=16"])
    encode_dataset(base / "autoencoder", encode_config, tmp_path / "latents", cache_text=True, device_name="cpu")
    with pytest.raises(IncompatibleError, match="lora.train_text_encoder encodes the captions .* re-encode without --cache-text"):
        run(base, tmp_path / "latents", tmp_path / "run", [*TEXT, "train.max_steps=1"])
    with pytest.raises(IncompatibleError, match="objective.shuffle_tags/tag_dropout change captions every step"):
        run(base, tmp_path / "latents", tmp_path / "run", ["objective.shuffle_tags=true", "train.max_steps=1"])
    assert not (tmp_path / "run").exists()


def test_text_encoder_settings_are_checked():
    with pytest.raises(ConfigError, match="lora.text_encoder_lr is set but lora.train_text_encoder=false"):
        load_config("train_lora", ["lora.text_encoder_lr=1e-5"])
    with pytest.raises(ConfigError, match="lora.text_encoder_lr: expected null"):
        load_config("train_lora", [*TEXT, "lora.text_encoder_lr=0"])


def test_a_text_encoder_other_than_clip_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    from ldm_cli.adapters.train import check_adaptable_text_encoder
    from ldm_cli.diffusion.text import TextEncoder

    bert = BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    with pytest.raises(IncompatibleError, match="needs a CLIP text encoder .* uses a 'bert' model; set lora.train_text_encoder=false"):
        check_adaptable_text_encoder(TextEncoder(bert, None, 8), tmp_path / "base")


def test_adapted_conditioning_encodes_dropped_captions_through_the_adapters_with_gradients():
    from ldm_cli.adapters.config import LoraConfig
    from ldm_cli.adapters.inject import inject_text_lora
    from ldm_cli.adapters.train import AdaptedTextConditioning
    from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder

    frozen = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))
    encoder = load_text_encoder(TextEncoderConfig(tiny=True, max_length=16))
    adapted = inject_text_lora(encoder.model, LoraConfig(rank=2, targets="attention_ff"))
    assert len(adapted) == 12  # q, k, v, out_proj, fc1, fc2 of two layers
    with torch.no_grad():
        for name, parameter in encoder.model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    conditioning = AdaptedTextConditioning(encoder)
    context = conditioning({"caption": ["a red circle", "a blue square"]}, torch.tensor([True, False]))
    torch.testing.assert_close(context[1], conditioning.uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(context[0], conditioning.encode(["a red circle"])[0], rtol=0, atol=1e-6)
    assert not torch.allclose(context[1], frozen.encode([""])[0], atol=1e-3)  # the adapters' empty prompt, not the base's
    context.square().sum().backward()
    grads = [p.grad for name, p in encoder.model.named_parameters() if ".lora_" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for name, p in encoder.model.named_parameters() if ".lora_" not in name)


@pytest.mark.slow
def test_two_processes_train_both_adapter_sets_like_one(base_and_latents, tmp_path):
    """Under torchrun the U-Net's adapters are synchronised by DDP and the text encoder's by an all-reduce:
    two processes of 2 images train what one process of 4 does."""
    from tests.diffusion.test_train_diffusion import _free_port

    base, latents = base_and_latents
    common = [*TRAIN, *TEXT, "train.max_steps=2", "objective.caption_dropout=0.5", "lora.text_encoder_lr=5e-3"]
    single = run(base, latents, tmp_path / "single", common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "-m", "ldm_cli.cli",
        "train-lora", "--latents", str(latents), "--base", str(base), "--out", str(tmp_path / "ddp"), "--device", "cpu",
        *common, "train.batch_size=2",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ours, theirs = read_lora_file(single).layers, read_lora_file(tmp_path / "ddp" / "lora.safetensors").layers
    assert sorted(ours) == sorted(theirs) and any(name.startswith("lora_te_") for name in ours)
    for name, layer in ours.items():
        # Adam turns summation-order noise in near-zero gradients into up to lr per element; the rest agrees tightly
        torch.testing.assert_close(theirs[name].up, layer.up, rtol=1e-3, atol=2e-4, msg=lambda m: name + m)
        torch.testing.assert_close(theirs[name].down, layer.down, rtol=1e-3, atol=2e-4, msg=lambda m: name + m)


@pytest.mark.slow
def test_init_from_continues_both_adapter_sets(base_and_latents, tmp_path):
    base, latents = base_and_latents
    start = run(base, latents, tmp_path / "start", [*TEXT, "train.max_steps=2", "train.warmup_steps=0"])
    # warm-up runs step 0 at lr 0: one step later the adapters are still the file's
    continued = run(base, latents, tmp_path / "continued", [*TEXT, "train.max_steps=1", f"lora.init_from={start}"])
    layers, again = read_lora_file(start).layers, read_lora_file(continued).layers
    assert sorted(again) == sorted(layers) and any(name.startswith("lora_te_") for name in layers)
    for name, layer in layers.items():
        torch.testing.assert_close(again[name].up, layer.up, rtol=0, atol=0)
        torch.testing.assert_close(again[name].down, layer.down, rtol=0, atol=0)
    with pytest.raises(IncompatibleError, match="has text-encoder layers; set lora.train_text_encoder=true"):
        run(base, latents, tmp_path / "unet-only", ["train.max_steps=1", f"lora.init_from={start}"])


def test_lora_injection_prints_nothing_of_bitsandbytes():
    # peft imports bitsandbytes where installed, which logs a warning at import on AVX512-BF16 CPUs that cannot
    # fetch its 4-bit CPU kernel; a fresh interpreter, since this one may have imported peft already
    code = (
        "from ldm_cli.adapters.config import LoraConfig\n"
        "from ldm_cli.adapters.inject import inject_lora\n"
        "from ldm_cli.diffusion.unet import UNet\n"
        "from tests.sampling.helpers import tiny_unet_config\n"
        "print(len(inject_lora(UNet(tiny_unet_config()), LoraConfig(rank=2, targets='all'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0
    assert "bitsandbytes" not in done.stderr and "gemm_4bit" not in done.stderr, done.stderr
