"""`ldm inpaint`: masks, the latent blend, 9-channel inpainting models against diffusers, the command and replay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from PIL import Image

from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.errors import DataError, UsageError
from ldm_cli.interop.convert import import_checkpoint
from ldm_cli.interop.export import export_diffusers, export_single_file
from ldm_cli.sampling.inpaint import inpaint, latent_blend, load_mask
from ldm_cli.sampling.metadata import read_metadata
from ldm_cli.sampling.pipeline import ImageJob, InitLatent, SamplingPipeline, SamplingSettings
from tests.sampling.helpers import write_tiny_latent_diffusion
from tests.tiny_sd import tiny_sd_parts

PROMPT = "a red square"
SIZE = 16


def quiet(message: str) -> None:
    pass


def _tiny_sd_inpaint_folder(root: Path, in_channels: int) -> Path:
    """A tiny random StableDiffusionInpaintPipeline saved by diffusers (U-Net reading `in_channels`)."""
    parts = tiny_sd_parts(in_channels, scale=0.1)
    with torch.no_grad():  # a narrow posterior: diffusers samples the VAE where ldm takes its mode
        parts["vae"].quant_conv.weight[4:] = 0
        parts["vae"].quant_conv.bias[4:] = -30
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                      timestep_spacing="leading")
    StableDiffusionInpaintPipeline(**parts, scheduler=scheduler).save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inpaint-images")
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "init.png")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 6:14] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(folder / "mask-rgb.png")
    Image.fromarray(np.concatenate([pixels, 255 - mask[..., None]], axis=-1)).save(folder / "init-alpha.png")
    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(folder / "black.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8)).save(folder / "white.png")
    Image.fromarray(np.kron(mask[::2, ::2], np.ones((4, 4), dtype=np.uint8))).save(folder / "mask-big.png")  # 32x32
    return {path.stem: path for path in folder.iterdir()}


@pytest.fixture
def ldm(ldm):
    """`ldm ARGS` through cli.main (conftest's `ldm`): (exit code, stdout + stderr)."""

    def run(*args: str) -> tuple[int, str]:
        code, out, err = ldm(*args)
        return code, out + err

    return run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_latent_diffusion(tmp_path_factory.mktemp("inpaint-model") / "model")


# ---- masks ----


def test_masks_from_l_rgb_and_alpha_agree(images):
    def load(source, init="init"):
        return load_mask(str(source), images[init], (SIZE, SIZE), None, (SIZE, SIZE))

    grey, rgb, alpha = load(images["mask"]), load(images["mask-rgb"]), load("alpha", "init-alpha")
    assert torch.equal(grey.pixels, rgb.pixels) and torch.equal(grey.pixels, alpha.pixels)
    assert grey.pixels.shape == (1, SIZE, SIZE) and grey.pixels.sum().item() == 64
    assert grey.note is None and grey.sha256 != rgb.sha256
    with pytest.raises(UsageError, match="no alpha channel"):
        load("alpha")
    with pytest.raises(UsageError, match="all black: nothing to repaint"):
        load(images["black"])
    assert "all white: the whole image is repainted" in load(images["white"]).note
    resized = load(images["mask-big"])
    assert resized.note.startswith("note: mask mask-big.png is 32x32, the init image 16x16; mask resized to 16x16")
    assert torch.equal((resized.pixels >= 0.5).float(), grey.pixels)
    with pytest.raises(DataError, match="mask image not found"):
        load(images["mask"].parent / "missing.png")


def test_latent_blend_walks_the_kept_region_along_the_noised_init():
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    seen = []

    def denoise(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    blended = latent_blend(denoise, x0, noise, keep)
    out = blended(torch.full((1, 4, 4, 4), 9.0), 2.0)
    assert torch.equal(seen[0][..., :2], (x0 + 2.0 * noise)[..., :2]) and (seen[0][..., 2:] == 9).all()
    assert torch.equal(out[..., :2], x0[..., :2]) and (out[..., 2:] == 0).all()


# ---- 9-channel inpainting models, and the 4-channel blend, against diffusers ----


@pytest.mark.slow
@pytest.mark.parametrize(("in_channels", "strength"), [(9, 1.0), (4, 0.75)], ids=["inpainting-unet", "latent-blend"])
def test_inpaint_matches_diffusers_inpaint_pipeline(images, tmp_path, in_channels, strength):
    folder = _tiny_sd_inpaint_folder(tmp_path / "diffusers", in_channels)
    bundle = import_checkpoint(folder, tmp_path / "bundle", log=quiet)
    model = load_latent_diffusion(bundle.path)
    assert model.is_inpainting == (in_channels == 9) and model.unet.config.in_channels == in_channels
    pipeline = SamplingPipeline(model)
    settings = SamplingSettings(steps=4, guidance_scale=4.0, sampler="euler", height=SIZE, width=SIZE,
                                timestep_spacing="leading", strength=strength)
    init_image, mask_image = Image.open(images["init"]).convert("RGB"), Image.open(images["mask"])
    init = torch.from_numpy(np.array(init_image)).permute(2, 0, 1).float() / 127.5 - 1
    mask = load_mask(str(images["mask"]), images["init"], (SIZE, SIZE), None, (SIZE, SIZE)).pixels
    job = ImageJob(PROMPT, 7, InitLatent(pipeline.encode_image(init), "init"))
    ours = inpaint(pipeline, job, settings, init, mask)

    reference = StableDiffusionInpaintPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(7))[None]
    sigma = pipeline.sigmas(settings)[0].item()
    options = {}
    if in_channels == 9:  # the masked image's latent as ldm makes it (the mode; diffusers would sample)
        options["masked_image_latents"] = pipeline.encode_image(init * (mask < 0.5))[None]
        options["latents"] = noise * sigma / math.sqrt(sigma**2 + 1)  # diffusers multiplies by init_noise_sigma
    else:  # the init as ldm's latent (diffusers would sample the VAE first, from the generator its noise comes from)
        options["generator"] = torch.Generator().manual_seed(7)  # its noise is then ldm's seed-7 noise
        options["masked_image_latents"] = torch.zeros(1, 4, 8, 8)  # unread by a 4-channel U-Net
    image = init_image if in_channels == 9 else job.init.latent[None]
    with torch.no_grad():
        theirs = reference(
            PROMPT, image=image, mask_image=mask_image, height=SIZE, width=SIZE, strength=strength,
            num_inference_steps=4, guidance_scale=4.0, output_type="pt", **options,
        ).images
    assert theirs.std() > 0.01
    torch.testing.assert_close((ours + 1) / 2, theirs, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_inpainting_models_convert_from_a_single_file_and_refuse_plain_sampling(ldm, tmp_path):
    folder = _tiny_sd_inpaint_folder(tmp_path / "diffusers", 9)
    bundle = import_checkpoint(folder, tmp_path / "bundle", log=quiet)
    single = export_single_file(bundle.path, tmp_path / "inpaint.safetensors", log=quiet)
    from ldm_cli.interop.convert import ImportOptions

    again = import_checkpoint(single, tmp_path / "again", ImportOptions(text_encoder=str(folder)), log=quiet)
    model = load_latent_diffusion(again.path)
    assert model.is_inpainting and model.unet.conv_in.weight.shape[1] == 9
    torch.testing.assert_close(model.unet.conv_in.weight, load_latent_diffusion(bundle.path).unet.conv_in.weight, rtol=0, atol=0)
    exported = export_diffusers(again.path, tmp_path / "exported", log=quiet)
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    code, output = ldm("sample", "--model", again.path, "--prompt", "x", "--out", tmp_path / "out")
    assert code != 0 and "is an inpainting model" in output and "ldm inpaint" in output


# ---- the command ----


@pytest.mark.slow
def test_inpaint_command_keeps_unmasked_pixels_and_replays(ldm, images, tiny_model, tmp_path):
    out = tmp_path / "out"
    long_prompt = "a (red:1.2) square, " * 6  # several chunks of the tiny encoder
    code, output = ldm(
        "inpaint", "--model", tiny_model, "--init", images["init"], "--mask", images["mask"],
        "--prompt", long_prompt, "--steps", "3", "--sampler", "unipc", "--mask-blur", "1", "--out", out,
    )
    assert code == 0, output
    [made] = sorted(out.glob("*.png"))
    init = np.array(Image.open(images["init"]).convert("RGB")).astype(int)
    pixels = np.array(Image.open(made).convert("RGB")).astype(int)
    mask = np.array(Image.open(images["mask"])) > 0
    far = np.ones_like(mask)
    far[1:15, 3:16] = False
    assert np.array_equal(pixels[far], init[far])  # bit-identical outside the mask
    assert np.abs(pixels[mask] - init[mask]).mean() > 5  # repainted inside
    meta = read_metadata(made)
    assert meta["mode"] == "inpaint" and meta["mask_blur"] == 1.0 and meta["keep_unmasked"] is True
    assert len(meta["mask_sha256"]) == 64 and meta["sampler"] == "unipc" and meta["prompt_weighting"] is True

    code, output = ldm("sample", "--replay", made, "--out", tmp_path / "replay")
    assert code == 0, output
    [again] = sorted((tmp_path / "replay").glob("*.png"))
    assert np.array_equal(np.array(Image.open(again)), np.array(Image.open(made)))

    Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8)).save(Path(meta["mask"]))  # the mask changes
    code, output = ldm("sample", "--replay", made, "--out", tmp_path / "replay")
    assert code != 0 and "is not the mask" in output
    Image.fromarray(mask.astype(np.uint8) * 255).save(Path(meta["mask"]))  # put it back for the other tests


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mask", "black"], "all black: nothing to repaint"),
        (["--mask", "alpha"], "has no alpha channel"),
        (["--mask", "mask", "--mask-blur", "-1"], "--mask-blur must be >= 0"),
    ],
)
def test_inpaint_bad_inputs_are_one_line_errors(ldm, images, tiny_model, tmp_path, arguments, message):
    arguments = [images.get(value, value) for value in arguments]
    code, output = ldm(
        "inpaint", "--model", tiny_model, "--init", images["init"], "--prompt", "x", "--steps", "1",
        "--out", tmp_path / "out", *arguments,
    )
    assert code != 0 and message in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
