"""`sample`, `img2img` and `inpaint`: the options of each; the runs themselves are in `sampling/`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldm_cli.commands.options import (
    BATCH_SIZE,
    CLIP_SKIP,
    CONFIG_DIR,
    DEVICE,
    ETA,
    GRID,
    GUIDANCE,
    HEIGHT,
    JSON_SIDECAR,
    LORA,
    NEGATIVE_PROMPT,
    NO_PROMPT_WEIGHTING,
    NUM_IMAGES,
    OFFLINE,
    OVERRIDES,
    PRECISION,
    PROMPT,
    PROMPT_FILE,
    SAMPLE_OUT,
    SAMPLER,
    SEED,
    SHOW_CONFIG,
    STEPS,
    WIDTH,
    compose,
    required_out,
)
from ldm_cli.errors import UsageError


def sample(
    model: Optional[Path] = typer.Option(None, "--model", help="Latent-diffusion run directory or bundle."),
    prompt: Optional[list[str]] = PROMPT,
    prompt_file: Optional[Path] = PROMPT_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    num_images: int = NUM_IMAGES,
    batch_size: int = BATCH_SIZE,
    steps: int = STEPS,
    guidance_scale: float = GUIDANCE,
    sampler: str = SAMPLER,
    seed: int = SEED,
    height: Optional[int] = HEIGHT,
    width: Optional[int] = WIDTH,
    eta: Optional[float] = ETA,
    precision: str = PRECISION,
    device: str = DEVICE,
    offline: bool = OFFLINE,
    grid: bool = GRID,
    as_json: bool = JSON_SIDECAR,
    no_prompt_weighting: bool = NO_PROMPT_WEIGHTING,
    clip_skip: int = CLIP_SKIP,
    out: Optional[Path] = SAMPLE_OUT,
    lora: Optional[list[str]] = LORA,
    replay: Optional[Path] = typer.Option(None, "--replay", help="Remake an image from its PNG metadata (all other settings come from it)."),
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Text → images with a trained latent-diffusion model; each PNG carries its settings."""
    config = compose("sample", overrides, config_dir, [], show_config)
    out = required_out(out)
    from ldm_cli.sampling.commands import SampleRequest, run_replay, run_sample

    if replay is not None:
        if prompt or prompt_file or lora:
            raise UsageError("--replay takes the prompt, LoRAs and every setting from the image; drop --prompt/--prompt-file/--lora")
        written = run_replay(replay, out, config, model=model, device_name=device, json_sidecar=as_json)
    else:
        written = run_sample(SampleRequest(
            out=out, model=model, prompts=list(prompt or []), prompt_file=prompt_file, negative_prompt=negative_prompt,
            num_images=num_images, batch_size=batch_size, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
            seed=seed, height=height, width=width, eta=eta, precision=precision, device=device, grid=grid,
            json_sidecar=as_json, loras=list(lora or []), prompt_weighting=not no_prompt_weighting, clip_skip=clip_skip,
        ), config)
    typer.echo(written.summary())


def img2img(
    model: Path = typer.Option(..., "--model", help="Latent-diffusion run directory or bundle."),
    init: Path = typer.Option(..., "--init", help="An init image, or a folder of them (each is used)."),
    strength: float = typer.Option(0.75, "--strength", help="How much to change the image: 0 keeps it, 1 ignores it."),
    prompt: Optional[list[str]] = PROMPT,
    prompt_file: Optional[Path] = PROMPT_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    num_images: int = NUM_IMAGES,
    batch_size: int = BATCH_SIZE,
    steps: int = STEPS,
    guidance_scale: float = GUIDANCE,
    sampler: str = SAMPLER,
    seed: int = SEED,
    height: Optional[int] = typer.Option(None, "--height", help="Resize and centre-crop the init to this height (default: keep its size)."),
    width: Optional[int] = typer.Option(None, "--width", help="Resize and centre-crop the init to this width (default: keep its size)."),
    eta: Optional[float] = ETA,
    precision: str = PRECISION,
    device: str = DEVICE,
    offline: bool = OFFLINE,
    grid: bool = GRID,
    as_json: bool = JSON_SIDECAR,
    no_prompt_weighting: bool = NO_PROMPT_WEIGHTING,
    clip_skip: int = CLIP_SKIP,
    out: Optional[Path] = SAMPLE_OUT,
    lora: Optional[list[str]] = LORA,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Image + text → images (SDEdit): noise the init's latent to --strength, then denoise it."""
    config = compose("sample", overrides, config_dir, [], show_config)
    out = required_out(out)
    from ldm_cli.sampling.commands import SampleRequest, run_img2img

    written = run_img2img(SampleRequest(
        out=out, model=model, prompts=list(prompt or []), prompt_file=prompt_file, negative_prompt=negative_prompt,
        num_images=num_images, batch_size=batch_size, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
        seed=seed, height=height, width=width, eta=eta, precision=precision, device=device, grid=grid,
        json_sidecar=as_json, init=init, strength=strength, loras=list(lora or []), prompt_weighting=not no_prompt_weighting,
        clip_skip=clip_skip,
    ), config)
    typer.echo(written.summary())


def inpaint_command(
    model: Path = typer.Option(..., "--model", help="Latent-diffusion run directory or bundle (any, or an inpainting model)."),
    init: Path = typer.Option(..., "--init", help="The image to repaint."),
    mask: str = typer.Option(..., "--mask", help="PNG mask: white is repainted, black kept; or 'alpha': the init's transparent pixels."),
    strength: float = typer.Option(1.0, "--strength", help="How much of the masked region to change: 1 repaints it from noise."),
    mask_blur: float = typer.Option(4.0, "--mask-blur", help="Feather the pasted-back edge by a Gaussian of this many pixels."),
    keep_unmasked: bool = typer.Option(True, "--keep-unmasked/--no-keep-unmasked", help="Paste the init's pixels back outside the mask."),
    prompt: Optional[list[str]] = PROMPT,
    prompt_file: Optional[Path] = PROMPT_FILE,
    negative_prompt: str = NEGATIVE_PROMPT,
    num_images: int = NUM_IMAGES,
    steps: int = STEPS,
    guidance_scale: float = GUIDANCE,
    sampler: str = SAMPLER,
    seed: int = SEED,
    height: Optional[int] = typer.Option(None, "--height", help="Resize and centre-crop the init (and mask) to this height."),
    width: Optional[int] = typer.Option(None, "--width", help="Resize and centre-crop the init (and mask) to this width."),
    eta: Optional[float] = ETA,
    precision: str = PRECISION,
    device: str = DEVICE,
    grid: bool = GRID,
    as_json: bool = JSON_SIDECAR,
    no_prompt_weighting: bool = NO_PROMPT_WEIGHTING,
    clip_skip: int = CLIP_SKIP,
    out: Optional[Path] = SAMPLE_OUT,
    offline: bool = OFFLINE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Image + mask + text → images: repaint the mask's white pixels, keep the black ones."""
    config = compose("sample", overrides, config_dir, [], show_config)
    out = required_out(out)
    from ldm_cli.sampling.commands import SampleRequest
    from ldm_cli.sampling.inpaint import InpaintOptions, run_inpaint

    written = run_inpaint(SampleRequest(
        out=out, model=model, prompts=list(prompt or []), prompt_file=prompt_file, negative_prompt=negative_prompt,
        num_images=num_images, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed, height=height,
        width=width, eta=eta, precision=precision, device=device, grid=grid, json_sidecar=as_json, init=init,
        strength=strength, prompt_weighting=not no_prompt_weighting, clip_skip=clip_skip,
    ), InpaintOptions(mask, mask_blur, keep_unmasked), config)
    typer.echo(written.summary())
