"""`ldm inpaint`: repaint the white part of a mask, keep the black part.

Any model: latent blend (the 4-channel branch of diffusers' StableDiffusionInpaintPipeline, RePaint's
known-region step): wherever the mask is black, the model sees the init's latent noised to the current σ
with the run's own noise, and its x_0 estimate there is the init's latent, so every sampler walks the
kept region along x_0 + σ ε. Inpainting models (a U-Net reading 2 · latent + 1 channels, SD 1.5-
inpainting) instead read the mask and the masked image's latent as extra input channels, as diffusers'
9-channel branch does. After decoding, `keep_unmasked` pastes the init's own pixels back outside the
(blurred) mask, so unmasked pixels are bit-identical to the init.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ldm_cli.bundle import file_sha256
from ldm_cli.data.images import tensor_to_pil
from ldm_cli.errors import DataError, UsageError
from ldm_cli.config import SampleConfig
from ldm_cli.sampling import commands
from ldm_cli.sampling.commands import SampleRequest, Written
from ldm_cli.sampling.init_images import InitImage, inspect_init_image, list_init_images
from ldm_cli.sampling.pipeline import ImageJob, InitLatent, SamplingPipeline, SamplingSettings
from ldm_cli.sampling.samplers import sample

ALPHA = "alpha"  # --mask alpha: the init's transparent pixels are repainted
Denoise = Callable[[torch.Tensor, float], torch.Tensor]


# -------------------------------------------------------------------------------------------- masks


@dataclass
class Mask:
    """A mask at the sampling size: float [1, H, W] in [0, 1], 1 = repaint; where it came from and a note."""

    pixels: torch.Tensor
    source: str  # the mask file, or "alpha"
    sha256: str  # of the mask file (of the init for "alpha")
    note: Optional[str] = None


def _alpha_of(path: Path) -> Image.Image:
    image = Image.open(path)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        raise UsageError(f"--mask alpha: init image {path.name} has no alpha channel; give a mask image instead")
    return Image.eval(image.getchannel("A"), lambda value: 255 - value)  # transparent → white → repainted


def load_mask(
    source: str, init_path: Path, init_original: tuple[int, int], init_resized_to: Optional[tuple[int, int]],
    size: tuple[int, int],
) -> Mask:
    """Read a mask (L, RGB or RGBA PNG read as grey, or "alpha": the init's alpha channel) at `size` = (w, h).

    A mask of the init's own size gets the init's resize and centre crop; one of another size is resized
    to `size` with a note. An all-black mask is an error (nothing to repaint); an all-white one, a note.
    """
    if source == ALPHA:
        image, sha256, name = _alpha_of(init_path), file_sha256(init_path), f"the alpha channel of {init_path.name}"
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"mask image not found: {path}")
        try:
            with Image.open(path) as opened:
                image = opened.convert("L")
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read mask image {path} ({error})") from None
        sha256, name = file_sha256(path), f"mask {path.name}"
    note = None
    if image.size == init_original:
        if init_resized_to is not None:
            image = image.resize(init_resized_to, Image.Resampling.BICUBIC)
        left, top = (image.width - size[0]) // 2, (image.height - size[1]) // 2
        image = image.crop((left, top, left + size[0], top + size[1]))
    else:
        note = f"note: {name} is {image.width}x{image.height}, the init image {init_original[0]}x{init_original[1]}; mask resized to {size[0]}x{size[1]}"
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255)[None]
    if pixels.max() == 0:
        raise UsageError(f"{name} is all black: nothing to repaint (white mask pixels are repainted, black kept)")
    if pixels.min() == 1:
        note = (note + "; " if note else "note: ") + f"{name} is all white: the whole image is repainted"
    return Mask(pixels, source if source == ALPHA else str(Path(source).resolve()), sha256, note)


def blurred(mask: torch.Tensor, radius: float) -> torch.Tensor:
    """The mask feathered by a Gaussian of std `radius` pixels (0: unchanged)."""
    if radius <= 0:
        return mask
    image = Image.fromarray((mask[0] * 255).round().to(torch.uint8).numpy(), mode="L")
    return torch.from_numpy(np.array(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)).float().div(255)[None]


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int], dilate: bool) -> torch.Tensor:
    """[1, h, w] of 0/1 at the latent size from the binarised mask (white at ≥ 0.5, as diffusers).

    dilate=False: nearest-neighbour, as diffusers conditions an inpainting U-Net. dilate=True: a latent cell
    is repainted if any of its pixels is, so no masked pixel is left to a kept latent (the blend).
    """
    binary = (mask >= 0.5).float()[None]
    if dilate:
        return F.adaptive_max_pool2d(binary, latent_size)[0]
    return F.interpolate(binary, size=latent_size)[0]


# ------------------------------------------------------------------------------------------ sampling


def latent_blend(denoise: Denoise, x0: torch.Tensor, noise: torch.Tensor, keep: torch.Tensor) -> Denoise:
    """D(x; σ) that sees x_0 + σ ε where `keep` is 1 and answers x_0 there (`keep` = 1 − latent mask)."""

    def blended(x: torch.Tensor, sigma: float) -> torch.Tensor:
        known = x0 + noise * sigma
        return keep * x0 + (1 - keep) * denoise(keep * known + (1 - keep) * x, sigma)

    return blended


@torch.inference_mode()
def inpaint(
    pipeline: SamplingPipeline, job: ImageJob, settings: SamplingSettings, init: torch.Tensor, mask: torch.Tensor,
    callback: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """One image [1, 3, H, W] in [-1, 1] from the init [3, H, W] in [-1, 1] and the mask [1, H, W] (1: repaint),
    before any pasting back. `job.init` holds the init's latent."""
    texts = pipeline.encode_prompts([job.prompt, settings.negative_prompt], settings.prompt_weighting, settings.clip_skip)
    texts = texts.to(pipeline.device)
    context, uncond = texts[:1], texts[1:]
    sigmas = pipeline.sigmas(settings)
    x, generators = pipeline.prepare_latents([job], settings, sigmas)
    start = settings.start_index()
    walk = sigmas[start:]
    x0 = job.init.latent[None].float()
    latent_size = tuple(x0.shape[-2:])
    if pipeline.model.is_inpainting:
        # diffusers' 9-channel conditioning: the binarised mask at the latent size and the masked image's latent
        masked_image = init * (mask < 0.5)
        masked_latent = pipeline.encode_image(masked_image)[None]
        extra = torch.cat([latent_mask(mask, latent_size, dilate=False)[None].to(x0), masked_latent], dim=1)
        denoise = pipeline.guided_denoiser(context, uncond, settings.guidance_scale, walk, extra_channels=extra)
    else:
        noise = (x / walk[0].item()) if start == 0 else (x - x0) / walk[0].item()  # the run's ε, recovered
        keep = 1 - latent_mask(mask, latent_size, dilate=True)[None].to(x0)
        x = keep * (x0 + noise * walk[0].item()) + (1 - keep) * x
        denoise = latent_blend(pipeline.guided_denoiser(context, uncond, settings.guidance_scale, walk), x0, noise, keep)
    x = sample(settings.sampler, denoise, x, walk, generator=generators, callback=callback, **settings.sampler_options())
    return pipeline.decode(x)


def paste_unmasked(image: torch.Tensor, init: torch.Tensor, mask: torch.Tensor, blur: float) -> torch.Tensor:
    """The init's pixels where the blurred mask is 0, the generated ones where it is 1, blended between."""
    weight = blurred(mask, blur)
    return init * (1 - weight) + image * weight


# ------------------------------------------------------------------------------------------- command


@dataclass
class InpaintOptions:
    mask: str  # a mask image, or "alpha"
    mask_blur: float = 4.0
    keep_unmasked: bool = True


def inpaint_metadata(init: InitImage, mask: Mask, options: InpaintOptions, settings: SamplingSettings) -> dict[str, Any]:
    return {
        "strength": settings.strength,
        "init_image": str(init.path),
        "init_sha256": init.sha256,
        "init_resized_to": list(init.resized_to) if init.resized_to else None,
        "mask": mask.source,
        "mask_sha256": mask.sha256,
        "mask_blur": options.mask_blur,
        "keep_unmasked": options.keep_unmasked,
        "width": init.size[0],
        "height": init.size[1],
    }


def make_images(
    pipeline: SamplingPipeline, jobs: list[ImageJob], settings: SamplingSettings, init_pixels: torch.Tensor,
    mask: Mask, options: InpaintOptions,
) -> list[torch.Tensor]:
    """Each job's image [3, H, W] in [-1, 1], one at a time, pasted back when `keep_unmasked`."""
    images = []
    for job in jobs:
        image = inpaint(pipeline, job, settings, init_pixels, mask.pixels)[0]
        images.append(paste_unmasked(image, init_pixels, mask.pixels, options.mask_blur) if options.keep_unmasked else image)
    return images


def run_inpaint(request: SampleRequest, options: InpaintOptions, config: SampleConfig) -> Written:
    """`ldm inpaint`: an init image, a mask and prompts → images, one at a time."""
    prompts = commands.read_prompts(request.prompts, request.prompt_file)
    commands._check_counts(request, config)
    if request.init is None:
        raise UsageError("--init is required (the image to repaint)")
    if Path(request.init).is_dir():
        raise UsageError(f"--init {request.init} is a folder; ldm inpaint takes one image (and its --mask)")
    if options.mask_blur < 0:
        raise UsageError(f"--mask-blur must be >= 0 pixels, got {options.mask_blur}")
    device = commands.resolve_device(request.device)
    precision = commands.resolve_precision(request.precision, device)
    settings = commands._settings(request, config, strength=request.strength)
    limits = commands.limits_of(config)
    settings.height, settings.width = request.height or settings.height, request.width or settings.width
    settings.validate(limits=limits)
    init_path = list_init_images(request.init)[0]
    model = commands._load_model(request.model, device, precision, inpainting_ok=True)
    settings.validate(model.schedule.num_train_timesteps, limits)
    init = inspect_init_image(init_path, model, request.height, request.width)
    mask = load_mask(options.mask, init.path, init.original_size, init.resized_to, init.size)
    seed = commands.resolve_seed(request.seed, len(prompts) * request.num_images)
    for note in (init.note(), mask.note):
        if note:
            print(note)

    pipeline = commands._pipeline(model, device, precision, config)
    base = {**commands._base_metadata("inpaint", settings, pipeline), **inpaint_metadata(init, mask, options, settings)}
    pixels = init.pixels()
    latent = InitLatent(pipeline.encode_image(pixels), key=init.sha256)
    jobs = [ImageJob(prompt, seed + i, latent) for i, prompt in enumerate(p for p in prompts for _ in range(request.num_images))]
    folder, written, kept = commands.OutputFolder(request.out), [], []
    for job, image in zip(jobs, make_images(pipeline, jobs, settings, pixels, mask, options)):
        meta = {**base, "prompt": job.prompt, "seed": job.seed}
        written.append(folder.write_image(tensor_to_pil(image), job.seed, meta, request.json_sidecar))
        kept.append(image)
    grid = None
    if request.grid and kept:
        grid = folder.write_grid(kept, commands._grid_columns(len(kept), request.num_images), written[0], written[-1])
    return Written(written, grid)


def replay_inpaint(
    meta: dict[str, Any], image: Path, request: SampleRequest, config: SampleConfig, init: Optional[Path] = None,
    mask: Optional[str] = None,
) -> Written:
    """`--replay` of an inpainted image: needs the same init and mask files (by hash), says which differs."""
    for key in ("init_sha256", "mask_sha256", "mask", "strength"):
        if key not in meta:
            raise DataError(f"the inpaint metadata of {image} lacks {key}; it cannot be replayed")
    init_path = Path(init or meta.get("init_image") or "")
    if not init_path.is_file():
        raise DataError(f"the init image of {image} is no longer at {init_path}; put it back there (or pass --init) to replay")
    if file_sha256(init_path) != meta["init_sha256"]:
        raise DataError(f"{init_path} is not the init image {image} was made from (its sha256 differs)")
    mask_source = mask or meta["mask"]
    if mask_source != ALPHA and not Path(mask_source).is_file():
        raise DataError(f"the mask of {image} is no longer at {mask_source}; put it back there (or pass --mask) to replay")
    device = commands.resolve_device(request.device)
    precision = commands.resolve_precision(meta["precision"], device)
    limits = commands.limits_of(config)
    settings = commands.settings_from_metadata(meta, image, limits)
    model = commands._load_model(request.model, device, precision, inpainting_ok=True)
    commands.check_replay_model(model, request.model, meta, image, device, settings, limits)
    resized_to = tuple(meta["init_resized_to"]) if meta.get("init_resized_to") else None
    plan = inspect_init_image(init_path, model, settings.height, settings.width, resized_to, replay=True)
    loaded_mask = load_mask(mask_source, plan.path, plan.original_size, plan.resized_to, plan.size)
    if loaded_mask.sha256 != meta["mask_sha256"]:
        raise DataError(f"{mask_source} is not the mask {image} was made with (its sha256 differs)")
    options = InpaintOptions(mask_source, float(meta.get("mask_blur", 0.0)), bool(meta.get("keep_unmasked", True)))
    pipeline = commands._pipeline(model, device, precision, replace(config, compile=bool(meta.get("compiled", False))))
    pixels = plan.pixels()
    latent = InitLatent(pipeline.encode_image(pixels), key=plan.sha256)
    job = ImageJob(meta["prompt"], int(meta["seed"]), latent)
    [result] = make_images(pipeline, [job], settings, pixels, loaded_mask, options)
    replayed = {**meta, **commands.replay_identity(model, device)}
    path = commands.OutputFolder(request.out).write_image(tensor_to_pil(result), job.seed, replayed, request.json_sidecar)
    return Written([path])
