"""`ldm quickstart`: the whole pipeline on the built-in shapes data, on a CPU, in minutes.

Each stage writes an ordinary run directory (resumable, usable by the other commands); a stage
whose output is already complete is skipped, so re-running the quickstart continues where it
stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ldm_cli.autoencoder.lpips import load_lpips
from ldm_cli.config import load_config
from ldm_cli.errors import MissingWeightsError

# (colour, shape) pairs removed from the training data: prompts asking for them test
# whether the model composes attributes it only saw apart
HELD_OUT_PAIRS = {("purple", "triangle"), ("orange", "circle"), ("green", "cross")}

GRID_PROMPTS = [
    "a large red circle in the center on a white background",
    "a large blue square in the center on a white background",
    "a large yellow triangle in the center on a black background",
    "a large green diamond in the center on a white background",
    "a small pink cross in the top left on a black background",
    "a large blue circle in the bottom right on a gray background",
    "a large purple triangle in the center on a white background",  # held-out pair
    "a large orange circle in the center on a black background",  # held-out pair
]

PRESET = {
    "images": 4000,
    "size": 32,
    "vae": ["autoencoder=tiny", "train=vae_tiny", "loss=vae_tiny"],
    "diffusion": ["unet=tiny", "text_encoder=minilm", "train=diffusion_tiny", "objective=min_snr"],
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "adherence_prompts": 64,
}


def write_training_shapes(out: Path, count: int, size: int) -> Path:
    """The shapes set without the held-out colour/shape pairs."""
    from ldm_cli.data.shapes import parse_caption, write_shapes_dataset

    if (out / "metadata.jsonl").is_file() and (out / ".complete").is_file():
        return out
    write_shapes_dataset(out, count, size, seed=0)
    kept = []
    for line in (out / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        attrs = parse_caption(entry["text"])
        if (attrs["colour"], attrs["shape"]) in HELD_OUT_PAIRS:
            (out / entry["file_name"]).unlink()
        else:
            kept.append(line)
    (out / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    (out / ".complete").write_text("")
    return out


def _stage(number: int, title: str) -> float:
    typer.secho(f"\n[{number}/7] {title}", bold=True)
    return time.perf_counter()


def _done(started: float, timings: dict[str, float], name: str) -> None:
    timings[name] = time.perf_counter() - started
    typer.echo(f"      done in {timings[name]:.0f} s")


def run_quickstart(out: Path, device_name: str = "auto", extra_vae: list[str] = (), extra_diffusion: list[str] = ()) -> dict:
    from ldm_cli.autoencoder.train import train_autoencoder
    from ldm_cli.diffusion.train import train_unet
    from ldm_cli.latents.encode import encode_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()

    started = _stage(1, f"ldm data shapes: {PRESET['images']} captioned {PRESET['size']}px images")
    data = write_training_shapes(out / "data", PRESET["images"], PRESET["size"])
    _done(started, timings, "data")

    started = _stage(2, "ldm train-vae (tiny autoencoder)")
    vae_overrides = [f"data.path={data}", f"data.resolution={PRESET['size']}", *PRESET["vae"], *extra_vae]
    try:
        load_lpips()
    except MissingWeightsError:
        typer.echo("      LPIPS weights are not on this machine: training with L1 + KL (+ GAN) only")
        vae_overrides.append("loss.perceptual_weight=0")
    if not (out / "vae" / "bundle").is_dir():
        train_autoencoder(load_config("train_vae", vae_overrides), out / "vae", vae_overrides, device_name=device_name)
    vae_meta = json.loads((out / "vae" / "bundle" / "bundle.json").read_text())
    typer.echo(f"      held-out reconstruction: PSNR {vae_meta['holdout_metrics']['psnr']:.2f} dB, SSIM {vae_meta['holdout_metrics']['ssim']:.3f}")
    _done(started, timings, "train-vae")

    started = _stage(3, "ldm encode (latents + cached MiniLM text embeddings)")
    encode_overrides = [f"data.path={data}", "text_encoder=minilm"]
    encode_dataset(out / "vae", load_config("encode", encode_overrides), out / "latents", cache_text=True, device_name=device_name)
    _done(started, timings, "encode")

    started = _stage(4, "ldm train-diffusion (tiny U-Net, MiniLM text encoder)")
    diffusion_overrides = [*PRESET["diffusion"], *extra_diffusion]
    if not (out / "diffusion" / "bundle").is_dir():
        config = load_config("train_diffusion", diffusion_overrides)
        train_unet(config, out / "latents", out / "diffusion", diffusion_overrides, device_name=device_name)
    _done(started, timings, "train-diffusion")

    from ldm_cli.quickstart_sampling import adherence, grid_and_img2img

    started = _stage(5, "ldm sample (prompt grid, incl. colour/shape pairs never seen together)")
    started_img2img = grid_and_img2img(out, GRID_PROMPTS, PRESET, device_name, lambda: _stage(6, "ldm img2img (one image, several strengths)"))
    timings["sample"] = started_img2img - started
    _done(started_img2img, timings, "img2img")

    started = _stage(7, f"prompt adherence on {PRESET['adherence_prompts']} random prompts")
    scores = adherence(out, PRESET, device_name)
    _done(started, timings, "adherence")

    summary = {"vae": vae_meta["holdout_metrics"], "adherence": scores, "seconds": timings, "total_seconds": time.perf_counter() - total_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
