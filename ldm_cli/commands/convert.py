"""`ldm convert`: Stable Diffusion checkpoints in, diffusers folders or one SD file out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldm_cli.commands.options import OFFLINE


def convert_command(
    source: Path = typer.Option(..., "--from", help="SD .safetensors/.ckpt, diffusers folder, VAE file/folder, or an ldm bundle (to export)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory, diffusers folder, or .safetensors file to create (must not exist)."),
    to: str = typer.Option("ldm", "--to", help="ldm (import) | diffusers | sd-single-file"),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type", help="epsilon | v_prediction (default: the source's, else epsilon)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA U-Net of an original SD file when it has one."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Hub id or folder: the tokenizer for a single file's CLIP weights, or the text encoder when the source has none."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image side the model was trained at (default: the source's, else 512)."),
    merge_lora: Optional[list[str]] = typer.Option(None, "--merge-lora", help="Bake a LoRA (FILE or FILE:SCALE) into the weights; repeat for several."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Replace the model's autoencoder with this one (ldm bundle, VAE file or folder); it must share the encoder, as decoder-only fine-tunes such as sd-vae-ft-mse do."),
    offline: bool = OFFLINE,
) -> None:
    """Import Stable Diffusion checkpoints as ldm bundles, or export a bundle to diffusers / one SD file."""
    from ldm_cli.interop.convert import ImportOptions, convert_model

    options = ImportOptions(prediction_type=prediction_type, use_ema=ema, text_encoder=text_encoder, resolution=resolution)
    convert_model(source, out, to=to, options=options, log=typer.echo, merge_lora=list(merge_lora or []), vae=vae)
