"""`eval-vae` (reconstruction metrics of an autoencoder) and `eval-samples` (FID/KID between two folders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ldm_cli.commands.options import DEVICE, OFFLINE, announce


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
    from ldm_cli.autoencoder.evaluate import evaluate_folder
    from ldm_cli.autoencoder.lpips import lpips_sources

    announce(lpips_sources())

    metrics = evaluate_folder(vae, data, resolution=resolution, limit=limit, grid_path=grid, device_name=device)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))


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
    from ldm_cli.eval.fid import compute_fid_kid
    from ldm_cli.eval.inception import inception_source, load_inception
    from ldm_cli.training.precision import resolve_device

    announce([("Inception-v3", inception_source(inception))])
    target = resolve_device(device)
    network = load_inception(str(inception) if inception else None).to(target)
    metrics = compute_fid_kid(real, fake, network, batch_size=batch_size, device=target)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "\n".join(f"{k}: {v}" for k, v in metrics.items()))
