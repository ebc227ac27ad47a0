"""The `ldm` command line: one thin function per subcommand — parse, compose config, call in.

Every user-facing failure is an `LdmError`, printed as one `error:` line with its exit code;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer

from ldm_cli import __version__
from ldm_cli.errors import LdmError, UsageError, one_line
from ldm_cli.sampling.settings import SamplingSettings

app = typer.Typer(
    help="Train and sample latent diffusion models: images → autoencoder → latents → U-Net → samples.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Dataset tools: the built-in shapes dataset, and checking a folder.", no_args_is_help=True)
app.add_typer(data_app, name="data")

OVERRIDES = typer.Argument(None, help="Hydra overrides, e.g. autoencoder=tiny train.max_steps=200", show_default=False)
CONFIG_DIR = typer.Option(None, "--config-dir", help="A directory of your own configs, searched before the built-in ones.")
SHOW_CONFIG = typer.Option(False, "--show-config", help="Print the fully composed config and exit.")
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")


def _go_offline(value: bool) -> bool:
    if value:
        from ldm_cli.weights import set_offline

        set_offline()
    return value


OFFLINE = typer.Option(
    False, "--offline", callback=_go_offline, help="Never touch the network: missing weights are an error (also LDM_OFFLINE=1)."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """ldm: latent diffusion, end to end."""


def _config(name: str, overrides: Optional[list[str]], config_dir: Optional[Path], fixed: list[str], show: bool):
    from ldm_cli.config import load_config, to_yaml

    config = load_config(name, fixed + list(overrides or []), config_dir)
    if show:
        from ldm_cli.weights import config_sources, describe_sources

        typer.echo(to_yaml(config) + "".join(f"# weights: {line}\n" for line in describe_sources(config_sources(config))))
        raise typer.Exit()
    return config


def _is_main() -> bool:
    from ldm_cli.training.distributed import env_info

    return env_info().is_main


def _announce(sources: list) -> None:
    """The start-up line: which weight files this run reads and where from (stderr, rank 0)."""
    from ldm_cli.weights import describe_sources

    if _is_main():
        for line in describe_sources(sources):
            typer.echo(f"weights: {line}", err=True)


@app.command("train-vae")
def train_vae(
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder (sets data.path)."),
    out: Path = typer.Option(Path("runs/vae"), "--out", help="Run directory (re-running into it resumes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved config."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Fine-tune this autoencoder (an ldm run or bundle, or an imported SD VAE/model)."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Train the KL autoencoder (L1 + LPIPS + PatchGAN + KL) on an image folder."""
    config = _config("train_vae", overrides, config_dir, [f"data.path={data}"] if data else [], show_config)
    from ldm_cli.autoencoder.train import train_autoencoder
    from ldm_cli.weights import config_sources

    _announce(config_sources(config))
    bundle = train_autoencoder(config, out, list(overrides or []), resume=resume, device_name=device, init_from=init_from)
    if _is_main():
        typer.echo(f"autoencoder bundle: {bundle}")


@app.command("eval-vae")
def eval_vae(
    vae: Path = typer.Option(..., "--vae", help="Autoencoder run directory or bundle."),
    data: Path = typer.Option(..., "--data", help="Image folder to reconstruct."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Default: the bundle's training resolution."),
    limit: int = typer.Option(256, "--limit", help="At most this many images."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Where to write the comparison grid PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
) -> None:
    """Report PSNR, SSIM and LPIPS (its weights fetched when missing, unless offline) of an autoencoder on a folder."""
    import json

    from ldm_cli.autoencoder.evaluate import evaluate_folder
    from ldm_cli.autoencoder.lpips import lpips_sources

    _announce(lpips_sources())

    metrics = evaluate_folder(vae, data, resolution=resolution, limit=limit, grid_path=grid, device_name=device)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))


@app.command("quickstart")
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where every stage's run directory goes."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
) -> None:
    """Run the whole pipeline on the built-in shapes data (CPU-sized): data → VAE → latents → U-Net → samples."""
    from ldm_cli.quickstart import print_summary, run_quickstart

    print_summary(out, run_quickstart(out, device_name=device))


@app.command("eval-samples")
def eval_samples(
    real: Path = typer.Option(..., "--real", help="Folder of real images."),
    fake: Path = typer.Option(..., "--fake", help="Folder of generated images."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="Inception weights (torchvision or pytorch-fid file); default: pytorch-fid's, fetched into the torch hub cache."),
    batch_size: int = typer.Option(32, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
) -> None:
    """FID and KID between two image folders (Inception features)."""
    import json

    from ldm_cli.eval.fid import compute_fid_kid
    from ldm_cli.eval.inception import inception_source, load_inception
    from ldm_cli.training.precision import resolve_device

    _announce([("Inception-v3", inception_source(inception))])
    target = resolve_device(device)
    network = load_inception(str(inception) if inception else None).to(target)
    metrics = compute_fid_kid(real, fake, network, batch_size=batch_size, device=target)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in metrics.items()))


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Folder to write the images and metadata.jsonl into."),
    n: int = typer.Option(2000, "--n", help="Number of images."),
    size: int = typer.Option(32, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Draw the built-in captioned shapes dataset (no download)."""
    from ldm_cli.data.shapes import write_shapes_dataset

    if n <= 0 or size < 8:
        raise UsageError("--n must be positive and --size at least 8")
    write_shapes_dataset(out, n, size, seed=seed)
    typer.echo(f"wrote {n} captioned {size}x{size} images to {out}")


@data_app.command("check")
def data_check(
    directory: Path = typer.Argument(..., help="Image folder to check."),
    buckets: bool = typer.Option(False, "--buckets", help="Also print how many images each aspect-ratio bucket gets."),
    overrides: Optional[list[str]] = typer.Argument(None, help="data.* overrides as for `ldm encode`, e.g. data.resolution=512", show_default=False),
) -> None:
    """Count images, sizes, caption coverage, unreadable files and (--buckets) the bucket histogram of a folder."""
    from ldm_cli.config import load_config
    from ldm_cli.data.buckets import spec_from_config
    from ldm_cli.data.check import check_dataset, format_report

    data = load_config("encode", [f"data.path={directory}", *(overrides or [])]).data
    spec = spec_from_config(data, data.resolution) if buckets else None
    report = check_dataset(directory, data.resolution if buckets else None, data.holdout_fraction, buckets=spec,
                           caption_extension=data.caption_extension)
    typer.echo(format_report(report))


@app.command("encode")
def encode(
    vae: Path = typer.Option(..., "--vae", help="Autoencoder run directory or bundle."),
    data: Path = typer.Option(..., "--data", help="Captioned image folder."),
    out: Path = typer.Option(..., "--out", help="Latent dataset directory (re-running resumes)."),
    cache_text: bool = typer.Option(False, "--cache-text", help="Also store the text encoder's outputs."),
    flip: bool = typer.Option(False, "--flip", help="Also store a horizontally flipped copy of each image."),
    buckets: bool = typer.Option(False, "--buckets", help="Aspect-ratio buckets instead of square crops (data.buckets=true)."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Encode an image folder into a sharded latent dataset with a trained autoencoder."""
    fixed = [f"data.path={data}"] + (["flip=true"] if flip else []) + (["data.buckets=true"] if buckets else [])
    config = _config("encode", overrides, config_dir, fixed, show_config)
    from ldm_cli.data.buckets import format_histogram
    from ldm_cli.latents.encode import encode_dataset
    from ldm_cli.weights import config_sources

    _announce(config_sources(config, text_encoder=cache_text))
    index = encode_dataset(vae, config, out, cache_text=cache_text, device_name=device)
    if _is_main():
        typer.echo(f"latent dataset: {out} ({index['count']} items)")
        if index.get("bucket_counts"):
            typer.echo(format_histogram([(tuple(entry["size"]), entry["count"]) for entry in index["bucket_counts"]]))


@app.command("train-diffusion")
def train_diffusion(
    latents: Path = typer.Option(..., "--latents", help="Latent dataset from `ldm encode`."),
    out: Path = typer.Option(Path("runs/diffusion"), "--out", help="Run directory (re-running into it resumes)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a latent-diffusion bundle's U-Net (fine-tuning)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved config."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Train a text-conditioned U-Net on cached latents."""
    config = _config("train_diffusion", overrides, config_dir, [], show_config)
    from ldm_cli.diffusion.train import train_unet
    from ldm_cli.weights import config_sources

    _announce(config_sources(config))
    bundle = train_unet(config, latents, out, list(overrides or []), resume=resume, device_name=device, init_from=init_from)
    if _is_main():
        typer.echo(f"latent-diffusion bundle: {bundle}")


@app.command("train-lora")
def train_lora_command(
    latents: Path = typer.Option(..., "--latents", help="Latent dataset from `ldm encode` (with the base model's autoencoder)."),
    base: Path = typer.Option(..., "--base", help="The frozen base model: a latent-diffusion bundle or run."),
    out: Path = typer.Option(Path("runs/lora"), "--out", help="Run directory; RUN/lora.safetensors is the product (re-running resumes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved config."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Train LoRA adapters (lora.rank, lora.targets, ...) on a frozen base model; writes a kohya/A1111 LoRA file."""
    config = _config("train_lora", overrides, config_dir, [], show_config)
    from ldm_cli.adapters.train import train_lora

    path = train_lora(config, latents, base, out, list(overrides or []), resume=resume, device_name=device)
    typer.echo(f"LoRA: {path}")


# options shared by `sample` and `img2img`
PROMPT = typer.Option(None, "--prompt", help='Text prompt; repeat for several. --prompt "" samples unconditionally.')
PROMPT_FILE = typer.Option(None, "--prompt-file", help="A text file with one prompt per line.")
NEGATIVE_PROMPT = typer.Option("", "--negative-prompt", help="What to steer away from (the unconditional branch).")
NUM_IMAGES = typer.Option(1, "-n", "--num-images", help="Images per prompt (img2img: per prompt and init image).")
BATCH_SIZE = typer.Option(1, "--batch-size", help="Images per forward pass: faster on a GPU; pixels then match batch size 1 up to rounding.")
STEPS = typer.Option(SamplingSettings.steps, "--steps", help="Sampling steps.")
GUIDANCE = typer.Option(SamplingSettings.guidance_scale, "--guidance-scale", help="Classifier-free guidance scale; 1 turns guidance off.")
SAMPLER = typer.Option(
    SamplingSettings.sampler, "--sampler",
    help="ddim | ddpm | euler | euler_ancestral | heun | lms | dpmpp_2m | dpmpp_2m_sde | dpmpp_sde | dpmpp_3m_sde | unipc "
         "(the registry in sampling/samplers.py).",
)
SEED = typer.Option(0, "--seed", help="Image i of the run uses seed SEED+i; a negative seed picks one at random.")
HEIGHT = typer.Option(None, "--height", help="Pixels; a multiple of the autoencoder's factor. Default: the model's resolution.")
WIDTH = typer.Option(None, "--width", help="Pixels; a multiple of the autoencoder's factor. Default: the model's resolution.")
ETA = typer.Option(None, "--eta", help="Noise of ancestral/SDE/DDIM samplers (default: the sampler's own).")
PRECISION = typer.Option("auto", "--precision", help="auto | fp32 | bf16 | fp16 (fp16 on CUDA only)")
GRID = typer.Option(False, "--grid", help="Also write a contact sheet of the run's images.")
JSON_SIDECAR = typer.Option(False, "--json", help="Also write each image's metadata as a .json beside it.")
LORA = typer.Option(None, "--lora", help="A LoRA file (kohya/A1111 or diffusers/PEFT .safetensors), FILE or FILE:SCALE; repeat to add several. Merged into the weights at load.")
NO_PROMPT_WEIGHTING = typer.Option(
    False, "--no-prompt-weighting", help="Read (word:1.2), [word] and BREAK in prompts literally."
)
CLIP_SKIP = typer.Option(SamplingSettings.clip_skip, "--clip-skip", help="Use the N-th CLIP hidden state from the end (A1111's CLIP skip; 1: the last).")
SAMPLE_OUT = typer.Option(None, "--out", help="Output folder (required); existing files are never overwritten.")


def _required_out(out: Optional[Path]) -> Path:
    # optional for Typer only so that --show-config works without it
    if out is None:
        raise UsageError("--out is required: the folder to write the images to")
    return out


@app.command("sample")
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
    config = _config("sample", overrides, config_dir, [], show_config)
    out = _required_out(out)
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


@app.command("img2img")
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
    config = _config("sample", overrides, config_dir, [], show_config)
    out = _required_out(out)
    from ldm_cli.sampling.commands import SampleRequest, run_img2img

    written = run_img2img(SampleRequest(
        out=out, model=model, prompts=list(prompt or []), prompt_file=prompt_file, negative_prompt=negative_prompt,
        num_images=num_images, batch_size=batch_size, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
        seed=seed, height=height, width=width, eta=eta, precision=precision, device=device, grid=grid,
        json_sidecar=as_json, init=init, strength=strength, loras=list(lora or []), prompt_weighting=not no_prompt_weighting,
        clip_skip=clip_skip,
    ), config)
    typer.echo(written.summary())


@app.command("inpaint")
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
    config = _config("sample", overrides, config_dir, [], show_config)
    out = _required_out(out)
    from ldm_cli.sampling.commands import SampleRequest
    from ldm_cli.sampling.inpaint import InpaintOptions, run_inpaint

    written = run_inpaint(SampleRequest(
        out=out, model=model, prompts=list(prompt or []), prompt_file=prompt_file, negative_prompt=negative_prompt,
        num_images=num_images, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed, height=height,
        width=width, eta=eta, precision=precision, device=device, grid=grid, json_sidecar=as_json, init=init,
        strength=strength, prompt_weighting=not no_prompt_weighting, clip_skip=clip_skip,
    ), InpaintOptions(mask, mask_blur, keep_unmasked), config)
    typer.echo(written.summary())


@app.command("convert")
def convert_command(
    source: Path = typer.Option(..., "--from", help="SD .safetensors/.ckpt, diffusers folder, VAE file/folder, or an ldm bundle (to export)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory, diffusers folder, or .safetensors file to create (must not exist)."),
    to: str = typer.Option("ldm", "--to", help="ldm (import) | diffusers | sd-single-file"),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type", help="epsilon | v_prediction (default: the source's, else epsilon)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA U-Net of an original SD file when it has one."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Hub id or folder: the tokenizer for a single file's CLIP weights, or the text encoder when the source has none."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image side the model was trained at (default: the source's, else 512)."),
    merge_lora: Optional[list[str]] = typer.Option(None, "--merge-lora", help="Bake a LoRA (FILE or FILE:SCALE) into the weights; repeat for several."),
    offline: bool = OFFLINE,
) -> None:
    """Import Stable Diffusion checkpoints as ldm bundles, or export a bundle to diffusers / one SD file."""
    from ldm_cli.interop.convert import ImportOptions, convert_model

    options = ImportOptions(prediction_type=prediction_type, use_ema=ema, text_encoder=text_encoder, resolution=resolution)
    convert_model(source, out, to=to, options=options, log=typer.echo, merge_lora=list(merge_lora or []))


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except LdmError as error:
        if debug:
            raise
        typer.echo(f"error: {one_line(error)}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
