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
from ldm_cli.errors import LdmError, UsageError

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
        typer.echo(to_yaml(config))
        raise typer.Exit()
    return config


@app.command("train-vae")
def train_vae(
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder (sets data.path)."),
    out: Path = typer.Option(Path("runs/vae"), "--out", help="Run directory (re-running into it resumes)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved config."),
    device: str = DEVICE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Train the KL autoencoder (L1 + LPIPS + PatchGAN + KL) on an image folder."""
    config = _config("train_vae", overrides, config_dir, [f"data.path={data}"] if data else [], show_config)
    from ldm_cli.autoencoder.train import train_autoencoder

    bundle = train_autoencoder(config, out, list(overrides or []), resume=resume, device_name=device)
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
) -> None:
    """Report PSNR, SSIM (and LPIPS when its weights are present) of an autoencoder on a folder."""
    import json

    from ldm_cli.autoencoder.evaluate import evaluate_folder

    metrics = evaluate_folder(vae, data, resolution=resolution, limit=limit, grid_path=grid, device_name=device)
    typer.echo(json.dumps(metrics, indent=2) if as_json else "\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items()))


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
def data_check(directory: Path = typer.Argument(..., help="Image folder to check.")) -> None:
    """Count images, sizes, caption coverage and unreadable files in a folder."""
    from ldm_cli.data.check import check_dataset, format_report

    typer.echo(format_report(check_dataset(directory)))


@app.command("encode")
def encode(
    vae: Path = typer.Option(..., "--vae", help="Autoencoder run directory or bundle."),
    data: Path = typer.Option(..., "--data", help="Captioned image folder."),
    out: Path = typer.Option(..., "--out", help="Latent dataset directory (re-running resumes)."),
    cache_text: bool = typer.Option(False, "--cache-text", help="Also store the text encoder's outputs."),
    flip: bool = typer.Option(False, "--flip", help="Also store a horizontally flipped copy of each image."),
    device: str = DEVICE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Encode an image folder into a sharded latent dataset with a trained autoencoder."""
    fixed = [f"data.path={data}"] + (["flip=true"] if flip else [])
    config = _config("encode", overrides, config_dir, fixed, show_config)
    from ldm_cli.latents.encode import encode_dataset

    index = encode_dataset(vae, config, out, cache_text=cache_text, device_name=device)
    typer.echo(f"latent dataset: {out} ({index['count']} items)")


@app.command("train-diffusion")
def train_diffusion(
    latents: Path = typer.Option(..., "--latents", help="Latent dataset from `ldm encode`."),
    out: Path = typer.Option(Path("runs/diffusion"), "--out", help="Run directory (re-running into it resumes)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a latent-diffusion bundle's U-Net (fine-tuning)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out with its saved config."),
    device: str = DEVICE,
    config_dir: Optional[Path] = CONFIG_DIR,
    show_config: bool = SHOW_CONFIG,
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Train a text-conditioned U-Net on cached latents."""
    config = _config("train_diffusion", overrides, config_dir, [], show_config)
    from ldm_cli.diffusion.train import train_unet

    bundle = train_unet(config, latents, out, list(overrides or []), resume=resume, device_name=device, init_from=init_from)
    typer.echo(f"latent-diffusion bundle: {bundle}")


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except LdmError as error:
        if debug:
            raise
        typer.echo(f"error: {error}", err=True)
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
