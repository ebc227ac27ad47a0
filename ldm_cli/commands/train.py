"""The pipeline's stages: `train-vae`, `encode`, `train-diffusion`, `train-lora`, and `quickstart` running them all."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldm_cli.commands.options import CONFIG_DIR, DEVICE, OFFLINE, OVERRIDES, SHOW_CONFIG, announce, compose, is_main


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
    config = compose("train_vae", overrides, config_dir, [f"data.path={data}"] if data else [], show_config)
    from ldm_cli.autoencoder.train import train_autoencoder
    from ldm_cli.weights import config_sources

    announce(config_sources(config))
    bundle = train_autoencoder(config, out, list(overrides or []), resume=resume, device_name=device, init_from=init_from)
    if is_main():
        typer.echo(f"autoencoder bundle: {bundle}")


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where every stage's run directory goes."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
) -> None:
    """Run the whole pipeline on the built-in shapes data (CPU-sized): data → VAE → latents → U-Net → samples."""
    from ldm_cli.quickstart import print_summary, run_quickstart

    print_summary(out, run_quickstart(out, device_name=device))


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
    config = compose("encode", overrides, config_dir, fixed, show_config)
    from ldm_cli.data.buckets import format_histogram
    from ldm_cli.latents.encode import encode_dataset
    from ldm_cli.weights import config_sources

    announce(config_sources(config, text_encoder=cache_text))
    index = encode_dataset(vae, config, out, cache_text=cache_text, device_name=device)
    if is_main():
        typer.echo(f"latent dataset: {out} ({index['count']} items)")
        if index.get("bucket_counts"):
            typer.echo(format_histogram([(tuple(entry["size"]), entry["count"]) for entry in index["bucket_counts"]]))


def train_diffusion(
    latents: Path = typer.Option(..., "--latents", help="Latent dataset from `ldm encode`."),
    out: Path = typer.Option(Path("runs/diffusion"), "--out", help="Run directory (re-running into it resumes)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a latent-diffusion bundle's U-Net (fine-tuning)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Autoencoder the model carries (default: the latents'); it must share their encoder, e.g. a decoder-only fine-tune."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved config."),
    device: str = DEVICE,
    offline: bool = OFFLINE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Train a text-conditioned U-Net on cached latents."""
    config = compose("train_diffusion", overrides, config_dir, [], show_config)
    from ldm_cli.diffusion.train import train_unet
    from ldm_cli.weights import config_sources

    announce(config_sources(config))
    bundle = train_unet(config, latents, out, list(overrides or []), resume=resume, device_name=device, init_from=init_from, vae=vae)
    if is_main():
        typer.echo(f"latent-diffusion bundle: {bundle}")


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
    config = compose("train_lora", overrides, config_dir, [], show_config)
    from ldm_cli.adapters.train import train_lora

    path = train_lora(config, latents, base, out, list(overrides or []), resume=resume, device_name=device)
    typer.echo(f"LoRA: {path}")
