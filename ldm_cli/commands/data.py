"""`ldm data`: draw the built-in shapes dataset, and check an image folder before encoding it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldm_cli.errors import UsageError


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
