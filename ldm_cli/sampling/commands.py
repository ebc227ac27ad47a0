"""`ldm sample` and `ldm img2img`: check every input, load the model, generate, write PNGs.

Everything a user can get wrong is checked before --out is created, so a failed command writes
nothing (sampling/output.py names and writes the files). Image i of a run uses seed S + i, so
`--seed S+i -n 1` remakes it alone, and `--replay` (sampling/replay.py) remakes an image from its
own metadata. The checks and steps `ldm inpaint` and `--replay` share with these commands are here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ldm_cli import __version__
from ldm_cli.adapters.merge import Applied
from ldm_cli.adapters.prompts import lora_metadata, lora_specs, read_loras
from ldm_cli.config import SampleConfig
from ldm_cli.data.images import tensor_to_pil
from ldm_cli.diffusion.load import LatentDiffusion, load_latent_diffusion
from ldm_cli.errors import UsageError
from ldm_cli.sampling.init_images import InitImage, inspect_init_image, list_init_images
from ldm_cli.sampling.output import OutputFolder, Written, grid_columns
from ldm_cli.sampling.pipeline import ImageJob, InitLatent, SamplingPipeline, check_image_size, weight_dtypes
from ldm_cli.sampling.settings import SamplingLimits, SamplingSettings
from ldm_cli.training.precision import resolve_device, resolve_precision

MAX_SEED = 2**63 - 1


@dataclass
class SampleRequest:
    """The command-line options of `ldm sample` / `ldm img2img`."""

    out: Path
    model: Optional[Path] = None
    prompts: list[str] = field(default_factory=list)  # each --prompt; "" is an unconditional sample
    prompt_file: Optional[Path] = None  # one prompt per line, added after --prompt's
    negative_prompt: str = ""
    num_images: int = 1  # per prompt (and per init image)
    batch_size: int = 1
    steps: int = SamplingSettings.steps
    guidance_scale: float = SamplingSettings.guidance_scale
    sampler: str = SamplingSettings.sampler
    seed: int = 0  # negative: a random seed (printed, and stored in each image)
    height: Optional[int] = None  # default: the model's resolution (img2img: from the init image)
    width: Optional[int] = None
    eta: Optional[float] = None
    precision: str = "auto"
    device: str = "auto"
    grid: bool = False
    json_sidecar: bool = False
    init: Optional[Path] = None  # img2img: an image or a folder of images
    strength: float = 0.75  # img2img only
    loras: list[str] = field(default_factory=list)  # each --lora FILE[:SCALE]
    prompt_weighting: bool = True
    clip_skip: int = 1


# ------------------------------------------------ checks and steps shared with inpaint and --replay


def read_prompts(prompts: list[str], prompt_file: Optional[Path]) -> list[str]:
    """--prompt values, then the non-blank lines of --prompt-file; at least one prompt in all."""
    prompts = list(prompts)
    if prompt_file is not None:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --prompt-file {prompt_file} ({error})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"--prompt-file {prompt_file} holds no prompts (one per line)")
        prompts += from_file
    if not prompts:
        raise UsageError('give --prompt TEXT (--prompt "" for unconditional samples) or --prompt-file FILE')
    return prompts


def resolve_seed(seed: int, count: int) -> int:
    if seed < 0:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed}")
    if seed + count > MAX_SEED:
        raise UsageError(f"--seed {seed} is too large; seeds S … S+{count - 1} must stay below 2^63")
    return seed


def resolve_run(
    request: SampleRequest, config: SampleConfig, strength: float
) -> tuple[torch.device, str, SamplingSettings, SamplingLimits]:
    """Device, precision, and the run's settings checked against the config's limits (the model's own
    step limit and image size are checked once it is loaded)."""
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    settings = SamplingSettings(
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        sampler=request.sampler,
        eta=request.eta,
        negative_prompt=request.negative_prompt,
        strength=strength,
        timestep_spacing=config.timestep_spacing,
        karras_sigmas=config.karras_sigmas,
        prompt_weighting=request.prompt_weighting,
        clip_skip=request.clip_skip,
    )
    limits = limits_of(config)
    settings.height, settings.width = request.height or settings.height, request.width or settings.width
    settings.validate(limits=limits)
    return device, precision, settings, limits


def limits_of(config: SampleConfig) -> SamplingLimits:
    return SamplingLimits(max_steps=config.max_steps, max_side=config.max_side, max_batch_size=config.max_batch_size)


def check_counts(request: SampleRequest, config: SampleConfig) -> None:
    """--num-images, --batch-size and --out, before anything is loaded."""
    if request.num_images < 1:
        raise UsageError(f"--num-images must be a positive integer, got {request.num_images}")
    if not 1 <= request.batch_size <= config.max_batch_size:
        raise UsageError(
            f"--batch-size must be between 1 and {config.max_batch_size} (raise it with max_batch_size=N), got {request.batch_size}"
        )
    check_out(request.out)


def check_out(out: Path) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")


def load_model(
    path: Optional[Path], device: torch.device, precision: str, loras: Applied = (), inpainting_ok: bool = False
) -> LatentDiffusion:
    """The model with its weights read straight into the dtypes sampling at `precision` computes in."""
    if path is None:
        raise UsageError("--model is required (a latent-diffusion run directory or bundle)")
    model = load_latent_diffusion(path, device, weight_dtypes(precision), loras)
    if model.is_inpainting and not inpainting_ok:
        raise UsageError(
            f"{path} is an inpainting model (its U-Net reads a mask and a masked image); use `ldm inpaint --init IMAGE --mask MASK`"
        )
    return model


def _loras(request: SampleRequest, prompts: list[str]) -> tuple[list[str], Applied]:
    """Prompts without their `<lora:…>` tags, and every LoRA file of the run, read."""
    prompts, specs = lora_specs(request.loras, prompts)
    return prompts, read_loras(specs)


def _lora_metadata(applied: Applied) -> dict[str, Any]:
    return {"loras": lora_metadata(list(applied))} if applied else {}


def make_pipeline(model: LatentDiffusion, device: torch.device, precision: str, config: SampleConfig) -> SamplingPipeline:
    """A sampling pipeline with the sample config's tiling and compile settings."""
    return SamplingPipeline(model, device, precision, config.tile_decode_above, config.tile_latent_size, compile=config.compile)


def base_metadata(mode: str, settings: SamplingSettings, pipeline: SamplingPipeline) -> dict[str, Any]:
    """What every image of a run records: its settings and the model, precision and device that made it."""
    bundle = pipeline.model.bundle
    return {
        "mode": mode,
        **{key: value for key, value in settings.to_metadata().items() if key not in ("height", "width", "strength")},
        "precision": pipeline.precision,
        "compiled": pipeline.compiled,  # compiled kernels round differently: a replay compiles too
        "model": str(bundle.path.resolve()),
        "model_hash": bundle.content_hash,
        "ldm_version": __version__,
        "device": pipeline.device.type,  # identical pixels are promised on the same kind of device
    }


def _batch_metadata(batch: list[ImageJob]) -> dict[str, Any]:
    # a deterministic batch's pixels depend (by float rounding) on its batch-mates: name them for --replay
    if len(batch) == 1:
        return {}
    return {"batch": {"seeds": [job.seed for job in batch], "prompts": [job.prompt for job in batch]}}


def _write_batches(
    pipeline: SamplingPipeline, jobs: list[ImageJob], settings: SamplingSettings, batch_size: int,
    folder: OutputFolder, base_meta: dict[str, Any], json_sidecar: bool, written: list[Path],
    keep: Optional[list[torch.Tensor]],
) -> None:
    for batch, images in pipeline.generate(jobs, settings, batch_size):
        for job, image in zip(batch, images):
            meta = {**base_meta, "prompt": job.prompt, "seed": job.seed, **_batch_metadata(batch)}
            written.append(folder.write_image(tensor_to_pil(image), job.seed, meta, json_sidecar))
            if keep is not None:
                keep.append(image)


# ------------------------------------------------------------------------------------------ commands


def run_sample(request: SampleRequest, config: SampleConfig) -> Written:
    """`ldm sample`: text → images."""
    prompts = read_prompts(request.prompts, request.prompt_file)
    check_counts(request, config)
    device, precision, settings, limits = resolve_run(request, config, strength=1.0)
    prompts, loras = _loras(request, prompts)
    model = load_model(request.model, device, precision, loras)
    settings.height = request.height or model.resolution
    settings.width = request.width or model.resolution
    settings.validate(model.schedule.num_train_timesteps, limits)
    check_image_size(settings.height, settings.width, model)
    seed = resolve_seed(request.seed, len(prompts) * request.num_images)

    pipeline = make_pipeline(model, device, precision, config)
    base = {**base_metadata("txt2img", settings, pipeline), "height": settings.height, "width": settings.width,
            **_lora_metadata(loras)}
    jobs = [ImageJob(prompt, seed + i) for i, prompt in enumerate(p for p in prompts for _ in range(request.num_images))]
    folder, written = OutputFolder(request.out), []
    kept: Optional[list[torch.Tensor]] = [] if request.grid else None
    _write_batches(pipeline, jobs, settings, request.batch_size, folder, base, request.json_sidecar, written, kept)
    grid = folder.write_grid(kept, grid_columns(len(kept), request.num_images), written[0], written[-1]) if kept else None
    return Written(written, grid)


def run_img2img(request: SampleRequest, config: SampleConfig) -> Written:
    """`ldm img2img`: init image(s) + text → images (SDEdit, Meng et al. 2022)."""
    prompts = read_prompts(request.prompts, request.prompt_file)
    check_counts(request, config)
    if request.init is None:
        raise UsageError("--init is required (an image or a folder of images)")
    device, precision, settings, limits = resolve_run(request, config, strength=request.strength)
    init_paths = list_init_images(request.init)
    prompts, loras = _loras(request, prompts)
    model = load_model(request.model, device, precision, loras)
    settings.validate(model.schedule.num_train_timesteps, limits)
    inits = [inspect_init_image(path, model, request.height, request.width) for path in init_paths]
    per_init = len(prompts) * request.num_images
    seed = resolve_seed(request.seed, len(inits) * per_init)

    pipeline = make_pipeline(model, device, precision, config)
    base = {**base_metadata("img2img", settings, pipeline), **_lora_metadata(loras)}
    folder, written = OutputFolder(request.out), []
    kept: Optional[list[torch.Tensor]] = [] if request.grid else None
    for number, init in enumerate(inits):
        if init.note():
            print(init.note())
        latent = InitLatent(pipeline.encode_image(init.pixels()), key=init.sha256)
        first_seed = seed + number * per_init
        jobs = [ImageJob(prompt, first_seed + i, latent)
                for i, prompt in enumerate(p for p in prompts for _ in range(request.num_images))]
        meta = {**base, **_init_metadata(init, settings)}
        _write_batches(pipeline, jobs, settings, request.batch_size, folder, meta, request.json_sidecar, written, kept)
    grid = folder.write_grid(kept, grid_columns(len(kept), per_init), written[0], written[-1]) if kept else None
    return Written(written, grid)


def _init_metadata(init: InitImage, settings: SamplingSettings) -> dict[str, Any]:
    return {
        "strength": settings.strength,
        "init_image": str(init.path),
        "init_sha256": init.sha256,
        "init_resized_to": list(init.resized_to) if init.resized_to else None,
        "width": init.size[0],
        "height": init.size[1],
    }
