"""Options and helpers that several subcommands share: device, offline, config composition, sampling settings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ldm_cli.errors import UsageError
from ldm_cli.sampling.settings import SamplingSettings

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


def compose(name: str, overrides: Optional[list[str]], config_dir: Optional[Path], fixed: list[str], show: bool):
    """The command's composed config; with --show-config, print it (and the weights it reads) and exit."""
    from ldm_cli.config import load_config, to_yaml

    config = load_config(name, fixed + list(overrides or []), config_dir)
    if show:
        from ldm_cli.weights import config_sources, describe_sources

        typer.echo(to_yaml(config) + "".join(f"# weights: {line}\n" for line in describe_sources(config_sources(config))))
        raise typer.Exit()
    return config


def is_main() -> bool:
    from ldm_cli.training.distributed import env_info

    return env_info().is_main


def announce(sources: list) -> None:
    """The start-up line: which weight files this run reads and where from (stderr, rank 0)."""
    from ldm_cli.weights import describe_sources

    if is_main():
        for line in describe_sources(sources):
            typer.echo(f"weights: {line}", err=True)


# options shared by `sample`, `img2img` and `inpaint`
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


def required_out(out: Optional[Path]) -> Path:
    # optional for Typer only so that --show-config works without it
    if out is None:
        raise UsageError("--out is required: the folder to write the images to")
    return out
