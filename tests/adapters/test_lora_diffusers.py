"""LoRA files against diffusers: the same pixels from ldm's merged weights and from diffusers'
`load_lora_weights`, for a peft LoRA saved by diffusers and for a kohya-layout file written from its spec."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ldm_cli.adapters.files import KOHYA, PEFT, read_lora_file
from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.sampling.pipeline import ImageJob, SamplingPipeline, SamplingSettings
from tests.interop.test_convert import bundle_dir, diffusers_dir, exported_dir  # noqa: F401  (fixtures)

PROMPT = "a red circle"
STEPS = 3


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / torch.mean((a - b) ** 2).item())


def ldm_image(bundle: Path, lora: Path, scale: float) -> torch.Tensor:
    model = load_latent_diffusion(bundle, loras=[(read_lora_file(lora), scale)])
    pipeline = SamplingPipeline(model)
    settings = SamplingSettings(steps=STEPS, guidance_scale=4.0, sampler="euler", height=16, width=16, timestep_spacing="leading")
    return (pipeline([ImageJob(PROMPT, seed=7)], settings) + 1) / 2, pipeline.sigmas(settings)[0].item()


def diffusers_image(exported: Path, lora: Path | None, scale: float, sigma: float) -> torch.Tensor:
    reference = StableDiffusionPipeline.from_pretrained(exported)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    if lora is not None:
        load_lora_like_diffusers(reference, lora)
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(7))[None]
    return reference(
        PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, height=16, width=16,
        latents=noise * sigma / math.sqrt(sigma**2 + 1), output_type="pt", cross_attention_kwargs={"scale": scale},
    ).images


def load_lora_like_diffusers(reference: StableDiffusionPipeline, path: Path) -> None:
    """`load_lora_weights`, with the text-encoder half done by peft itself: diffusers hands that half to
    transformers' `load_adapter`, which needs a newer peft than the package index has. Key conversion
    (kohya → diffusers → peft) and the LoraConfig are still diffusers'."""
    from diffusers.loaders.lora_base import _create_lora_config
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    reference.load_lora_into_unet(unet_state, alphas, reference.unet, metadata=metadata, adapter_name="lora", _pipeline=reference)
    text = {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    if not text:
        return
    text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(text))
    encoder = reference.text_encoder
    if not hasattr(encoder, "text_model"):
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    rank = {k: v.shape[1] for k, v in text.items() if k.endswith("lora_B.weight")}
    text_alphas = {k.removeprefix("text_encoder."): v for k, v in (alphas or {}).items() if k.startswith("text_encoder.")}
    text_metadata = {k.removeprefix("text_encoder."): v for k, v in (metadata or {}).items() if k.startswith("text_encoder.")}
    config = _create_lora_config(text, text_alphas or None, text_metadata or None, rank, is_unet=False)
    inject_adapter_in_model(config, encoder, adapter_name="lora")
    set_peft_model_state_dict(encoder, text, adapter_name="lora")


@pytest.fixture(scope="module")
def peft_lora(exported_dir, tmp_path_factory) -> Path:
    """A LoRA made with peft on diffusers' own U-Net and CLIP text encoder, saved by `save_lora_weights`."""
    reference = StableDiffusionPipeline.from_pretrained(exported_dir)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"])
    text_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    reference.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, reference.text_encoder)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # peft's random init is far from a trained LoRA's size
        for name, parameter in [*reference.unet.named_parameters(), *reference.text_encoder.named_parameters()]:
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5)
    out = tmp_path_factory.mktemp("peft-lora")
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(reference.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(reference.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
        weight_name="peft.safetensors",
    )
    return out / "peft.safetensors"


def kohya_layer(down_shape: tuple[int, ...], up_shape: tuple[int, ...], alpha: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "lora_down.weight": torch.randn(down_shape, generator=generator) / math.prod(down_shape[1:]) ** 0.5,
        "lora_up.weight": torch.randn(up_shape, generator=generator) / up_shape[1] ** 0.5,
        "alpha": torch.tensor(alpha),
    }


@pytest.fixture(scope="module")
def kohya_lora(tmp_path_factory) -> Path:
    """A kohya/A1111 file written from the layout's spec: attention, 1x1 conv proj_in, a 3x3 resnet conv
    (LoCon), a time projection, and `lora_te_` text-encoder layers."""
    generator = torch.Generator().manual_seed(5)
    layers = {
        # alphas: diffusers maps a non-default alpha onto attention and fc2 layers by a pattern that misses
        # them, so those keep the file's most common alpha (4) for its reference to hold
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 32), (32, 4), 4.0),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, 32), (32, 4), 4.0),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0": ((4, 32), (32, 4), 4.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 32, 1, 1), (32, 4, 1, 1), 4.0),
        "lora_unet_mid_block_resnets_0_conv1": ((2, 64, 3, 3), (64, 2, 1, 1), 1.0),
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj": ((4, 128), (64, 4), 2.0),
        "lora_te_text_model_encoder_layers_1_mlp_fc1": ((4, 32), (37, 4), 4.0),
        "lora_te_text_model_encoder_layers_1_mlp_fc2": ((4, 37), (32, 4), 4.0),
    }
    # every attention projection, as kohya writes them (diffusers needs the set to recognise the layout)
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layers[f"lora_te_text_model_encoder_layers_0_self_attn_{projection}"] = ((4, 32), (32, 4), 4.0)
    tensors = {f"{name}.{key}": value for name, (down, up, alpha) in layers.items()
               for key, value in kohya_layer(down, up, alpha, generator).items()}
    path = tmp_path_factory.mktemp("kohya-lora") / "kohya_style.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.mark.slow
def test_peft_lora_saved_by_diffusers_gives_diffusers_pixels(bundle_dir, exported_dir, peft_lora):
    lora = read_lora_file(peft_lora)
    assert lora.layout == PEFT and any(name.startswith("text_encoder.") for name in lora.layers)
    ours, sigma = ldm_image(bundle_dir, peft_lora, 0.7)
    theirs = diffusers_image(exported_dir, peft_lora, 0.7, sigma)
    plain = diffusers_image(exported_dir, None, 1.0, sigma)
    assert psnr(theirs, plain) < 35  # the LoRA changes the picture
    assert psnr(ours, theirs) >= 40


@pytest.mark.slow
def test_kohya_lora_with_text_encoder_and_conv_layers_gives_diffusers_pixels(bundle_dir, exported_dir, kohya_lora):
    assert read_lora_file(kohya_lora).layout == KOHYA
    ours, sigma = ldm_image(bundle_dir, kohya_lora, 0.8)
    theirs = diffusers_image(exported_dir, kohya_lora, 0.8, sigma)
    plain = diffusers_image(exported_dir, None, 1.0, sigma)
    assert psnr(theirs, plain) < 35
    assert psnr(ours, theirs) >= 40


@pytest.mark.slow
def test_file_written_by_train_lora_gives_diffusers_pixels(bundle_dir, exported_dir, shapes_dir, tmp_path):
    """U-Net (LoCon targets) and text-encoder adapters trained together: diffusers applies both halves as ldm does."""
    from safetensors.torch import load_file

    from ldm_cli.adapters.train import train_lora
    from ldm_cli.config import load_config
    from ldm_cli.latents.encode import encode_dataset

    encode_config = load_config("encode", [f"data.path={shapes_dir}", "data.resolution=16"])
    encode_dataset(bundle_dir / "autoencoder", encode_config, tmp_path / "latents", device_name="cpu")
    overrides = [
        "train=diffusion_tiny", "train.batch_size=4", "train.precision=fp32", "train.max_steps=3", "train.lr=3e-2",
        "train.warmup_steps=1", "train.eval_every=100", "train.image_every=100", "train.checkpoint_every=100",
        "objective.validation_loss_timesteps=[500]", "lora.rank=4", "lora.targets=all",
        "lora.train_text_encoder=true", "lora.text_encoder_lr=5e-2",
    ]
    path = train_lora(load_config("train_lora", overrides), tmp_path / "latents", bundle_dir, tmp_path / "run", overrides, device_name="cpu")
    tensors = load_file(str(path))
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_mlp_fc1.") for key in tensors)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, str(unet_only))
    ours, sigma = ldm_image(bundle_dir, path, 0.8)
    theirs = diffusers_image(exported_dir, path, 0.8, sigma)
    plain = diffusers_image(exported_dir, None, 1.0, sigma)
    without_text = diffusers_image(exported_dir, unet_only, 0.8, sigma)
    assert psnr(theirs, plain) < 45  # the trained LoRA changes the picture
    assert psnr(theirs, without_text) < 45  # and so does its text-encoder half
    assert psnr(ours, theirs) >= 40
