"""`ldm quickstart`: the whole pipeline on the built-in shapes data, on a CPU, in minutes.

Each stage writes an ordinary run directory (resumable, usable by the other commands); a stage
whose output is already complete is skipped, so re-running the quickstart continues where it
stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import typer

from ldm_cli.autoencoder.lpips import lpips_sources
from ldm_cli.bundle import load_bundle
from ldm_cli.config import load_config
from ldm_cli.errors import TrainingError

# (colour, shape) pairs removed from the U-Net's captioned data: prompts asking for them test
# whether the text-to-image model composes attributes it only saw apart
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
    "diffusion": [
        "unet=tiny", "text_encoder=minilm", "train=diffusion_tiny", "objective=min_snr",
        "objective.validation_prompts=['a large red circle in the center on a white background',"
        "'a large blue square in the center on a white background','a large yellow triangle in the center on a black background',"
        "'a large purple triangle in the center on a white background']",
    ],
    "sample_steps": 25,
    "guidance_scale": 4.0,
    "adherence_prompts": 256,  # random prompts: a rate near 90% is then known to about ±4 points
    "held_out_prompts": 128,  # prompts asking only for the held-out pairs, at every size, position, background
    "reconstructions": 256,  # fresh shapes images the autoencoder round-trips: the adherence it lets through
    # decoder-only steps trained beside the U-Net (the encoder, so the latents, stay fixed) on one of the
    # U-Net's threads: sharper small shapes. By the precision both train in: about as many as fit in the
    # U-Net's training time on a 2-core CPU, so that neither core idles nor the U-Net waits
    "decoder_steps": {"bf16": 4400, "fp32": 3000},
}


def write_training_shapes(out: Path, count: int, size: int) -> tuple[Path, Path]:
    """The shapes set twice: `out/autoencoder-data` whole, and `out/data` without the held-out colour/shape
    pairs. The autoencoder learns to compress every image (as SD's autoencoder learns from a broader set
    than any diffusion model trained on its latents); only the captioned set the U-Net learns from leaves
    the pairs out. A decoder that never drew a green cross draws a small one as a diamond, whatever the
    U-Net asks for."""
    from ldm_cli.data.shapes import parse_caption, write_shapes_dataset

    everything, captioned = out / "autoencoder-data", out / "data"
    if not (everything / ".complete").is_file():
        write_shapes_dataset(everything, count, size, seed=0)
        (everything / ".complete").write_text("")
    if not (captioned / ".complete").is_file():
        captioned.mkdir(parents=True, exist_ok=True)
        kept = []
        for line in (everything / "metadata.jsonl").read_text().splitlines():
            entry = json.loads(line)
            attrs = parse_caption(entry["text"])
            if (attrs["colour"], attrs["shape"]) not in HELD_OUT_PAIRS:
                kept.append(line)
                shutil.copyfile(everything / entry["file_name"], captioned / entry["file_name"])
        (captioned / "metadata.jsonl").write_text("\n".join(kept) + "\n")
        (captioned / ".complete").write_text("")
    return everything, captioned


def _sample(model: Path, out: Path, prompts: list[str], device_name: str, **options) -> list[Path]:
    from ldm_cli.config import SampleConfig
    from ldm_cli.sampling.commands import SampleRequest, run_img2img, run_sample

    request = SampleRequest(
        out=out, model=model, prompts=prompts, steps=PRESET["sample_steps"], guidance_scale=PRESET["guidance_scale"],
        batch_size=16, device=device_name, **options,
    )
    return (run_img2img if request.init else run_sample)(request, SampleConfig()).images


def _read(paths: list[Path]):
    import torch

    from ldm_cli.data.images import load_image_rgb, pil_to_tensor

    return torch.stack([pil_to_tensor(load_image_rgb(path)) for path in paths])


def prompt_grid(model: Path, out: Path, prompts: list[str], device_name: str, per_prompt: int = 4) -> Path:
    """`per_prompt` seeds of each prompt, one row per prompt, labelled."""
    from ldm_cli.grid import labelled_grid, save_image

    paths = _sample(model, out, prompts, device_name, num_images=per_prompt)
    grid = out / "grid.png"
    save_image(labelled_grid(_read(paths), prompts, columns=per_prompt, scale=3), grid)
    return grid


def img2img_strip(model: Path, init: Path, out: Path, device_name: str, strengths=(0.1, 0.25, 0.5, 0.75)) -> Path:
    """The init image, then img2img towards a blue circle at increasing strengths."""
    import torch
    import torch.nn.functional as F

    from ldm_cli.grid import labelled_grid, save_image

    prompt = "a large blue circle in the center on a white background"
    images = _read([_sample(model, out, [prompt], device_name, init=init, strength=s)[0] for s in strengths])
    init_image = F.interpolate(_read([init]), size=images.shape[-2:], mode="bilinear", antialias=True)
    label = f"init, then strength {', '.join(str(s) for s in strengths)}"
    strip = out / "strengths.png"
    save_image(labelled_grid(torch.cat([init_image, images]), [label], columns=len(strengths) + 1, scale=3), strip)
    return strip


def adherence(model: Path, out: Path, device_name: str) -> dict[str, dict]:
    """Score random prompts and, apart, prompts for the held-out pairs; one report (rates with Wilson
    95% intervals, breakdowns, confusion matrices) per set."""
    from PIL import Image

    from ldm_cli.eval.adherence import adherence_prompts, adherence_report, summary_line

    sets = {
        "random": adherence_prompts(PRESET["adherence_prompts"], seed=1),
        "held_out": adherence_prompts(PRESET["held_out_prompts"], seed=2, pairs=HELD_OUT_PAIRS),
    }
    reports = {}
    for name, prompts in sets.items():
        paths = _sample(model, out / name, prompts, device_name, seed=1000)
        reports[name] = adherence_report([Image.open(path).convert("RGB") for path in paths], prompts)
        typer.echo(f"      {name.replace('_', '-')}: {summary_line(reports[name])}")
    return reports


def reconstruction_adherence(vae: Path, count: int, size: int, seed: int = 3) -> dict:
    """Score the autoencoder's reconstructions of `count` freshly drawn images against their captions:
    what the autoencoder loses (a colour shifted, a corner rounded) no diffusion model can bring back."""
    import numpy as np
    import torch

    from ldm_cli.autoencoder.load import load_autoencoder
    from ldm_cli.data.images import pil_to_tensor, tensor_to_pil
    from ldm_cli.data.shapes import draw_shape_image
    from ldm_cli.eval.adherence import adherence_report

    autoencoder = load_autoencoder(vae)
    drawn = [draw_shape_image(np.random.default_rng([seed, index]), size) for index in range(count)]
    images = torch.stack([pil_to_tensor(image) for image, _, _ in drawn])
    with torch.no_grad():
        decoded = torch.cat([autoencoder.model.decode(autoencoder.model.encode(batch).mode()) for batch in images.split(64)])
    return adherence_report([tensor_to_pil(image) for image in decoded], [caption for _, caption, _ in drawn])


def autoencoder_report(run: Path, what: str) -> dict:
    """Held-out PSNR/SSIM from the run's bundle and its reconstructions scored, printed and returned."""
    from ldm_cli.eval.adherence import summary_line

    metrics = load_bundle(run / "bundle", kind="autoencoder").meta["holdout_metrics"]
    typer.echo(f"      {what}: held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}")
    reconstructed = reconstruction_adherence(run, PRESET["reconstructions"], PRESET["size"])
    typer.echo(f"      reconstructions of fresh images, scored: {summary_line(reconstructed, 'images')}")
    return {**metrics, "reconstruction_adherence": reconstructed}


def decoder_steps(device_name: str) -> int:
    """The decoder fine-tune's steps for the precision `precision=auto` trains in on this device."""
    from ldm_cli.training.precision import resolve_device, resolve_precision

    steps = PRESET["decoder_steps"]
    return steps.get(resolve_precision("auto", resolve_device(device_name)), steps["fp32"])


def start_decoder_fine_tune(out: Path, vae_overrides: list[str], steps: int, device_name: str) -> subprocess.Popen | None:
    """`ldm train-vae --init-from VAE loss.decoder_only=true` for `steps` in a one-thread process (its output
    goes to RUN.log); None when its bundle already exists."""
    if (out / "bundle").is_dir():
        return None
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "ldm_cli", "train-vae", "--out", str(out), "--init-from", str(out.parent / "vae"),
               "--device", device_name, *vae_overrides, "loss.decoder_only=true", f"train.max_steps={steps}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out.with_suffix(".log"), "ab") as log:
        # its own session: Ctrl-C reaches the quickstart only, which then stops it once, checkpoint saved
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)


def finish_decoder_fine_tune(process: subprocess.Popen | None, out: Path) -> None:
    if process is not None and process.wait() != 0:
        lines = out.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        raise TrainingError(f"the decoder fine-tune failed ({lines[-1] if lines else 'no output'}); its log: {out.with_suffix('.log')}")


def print_summary(out: Path, summary: dict) -> None:
    from ldm_cli.eval.adherence import summary_line

    vae = summary["vae"]
    typer.secho(f"\nquickstart finished in {summary['total_seconds'] / 60:.1f} min", bold=True)
    typer.echo(f"  autoencoder: held-out PSNR {vae['psnr']:.2f} dB, SSIM {vae['ssim']:.3f}; "
               f"its reconstructions scored: {summary_line(vae['reconstruction_adherence'], 'images')}")
    typer.echo(f"  prompt adherence, random prompts: {summary_line(summary['adherence']['random'])} (95% intervals)")
    typer.echo(f"  prompt adherence, held-out pairs: {summary_line(summary['adherence']['held_out'])}")
    typer.echo(f"  sample grid: {out / 'samples' / 'grid.png'}   img2img: {out / 'img2img' / 'strengths.png'}")
    typer.echo("\ncontinue from here:")
    typer.echo(f"  ldm sample --model {out / 'diffusion'} --prompt \"a large red square in the center on a black background\" -n 4 --out {out / 'mine'}")
    typer.echo(f"  ldm img2img --model {out / 'diffusion'} --init {out / 'data' / '00001.png'} --prompt \"a large green circle in the center on a white background\" --strength 0.6 --out {out / 'mine'}")
    typer.echo(f"  ldm train-diffusion --latents {out / 'latents'} --vae {out / 'vae-decoder'} --out {out / 'diffusion'} --resume train.max_steps=6000   # train longer")
    typer.echo("  ldm train-vae --data YOUR_IMAGES --out runs/my-vae autoencoder=kl_f8 data.resolution=256")


def _stage(number: int, title: str) -> float:
    typer.secho(f"\n[{number}/7] {title}", bold=True)
    return time.perf_counter()


def _done(started: float, timings: dict[str, float], name: str) -> None:
    timings[name] = time.perf_counter() - started
    typer.echo(f"      done in {timings[name]:.0f} s")


def run_quickstart(out: Path, device_name: str = "auto", extra_vae: list[str] = (), extra_diffusion: list[str] = ()) -> dict:
    import torch

    from ldm_cli.autoencoder.train import train_autoencoder
    from ldm_cli.diffusion.load import replace_autoencoder
    from ldm_cli.diffusion.train import train_unet
    from ldm_cli.latents.encode import encode_dataset

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()

    started = _stage(1, f"ldm data shapes: {PRESET['images']} captioned {PRESET['size']}px images")
    autoencoder_data, data = write_training_shapes(out, PRESET["images"], PRESET["size"])
    _done(started, timings, "data")

    started = _stage(2, "ldm train-vae (tiny autoencoder)")
    vae_overrides = [f"data.path={autoencoder_data}", f"data.resolution={PRESET['size']}", *PRESET["vae"], *extra_vae]
    # a CPU-sized demo uses LPIPS only when VGG16 is already here: its 528 MB download would dominate
    if any(where.origin == "download" for _, where in lpips_sources()):
        typer.echo("      VGG16 for LPIPS is not in the torch hub cache: training with L1 + KL (+ GAN) only")
        vae_overrides.append("loss.perceptual_weight=0")
    if not (out / "vae" / "bundle").is_dir():
        train_autoencoder(load_config("train_vae", vae_overrides), out / "vae", vae_overrides, device_name=device_name)
    first_vae = autoencoder_report(out / "vae", "autoencoder")
    _done(started, timings, "train-vae")

    started = _stage(3, "ldm encode (latents + cached MiniLM text embeddings)")
    encode_overrides = [f"data.path={data}", "text_encoder=minilm"]
    encode_dataset(out / "vae", load_config("encode", encode_overrides), out / "latents", cache_text=True, device_name=device_name)
    _done(started, timings, "encode")

    steps = decoder_steps(device_name)
    started = _stage(4, f"ldm train-diffusion (tiny U-Net, MiniLM text encoder); beside it, {steps} more decoder steps")
    decoder_run = out / "vae-decoder"
    decoder = start_decoder_fine_tune(decoder_run, vae_overrides, steps, device_name)
    threads = torch.get_num_threads()
    try:
        if decoder is not None:  # one thread each beats two threads that a third one keeps waiting
            torch.set_num_threads(max(1, threads - 1))
        diffusion_overrides = [*PRESET["diffusion"], *extra_diffusion]
        if not (out / "diffusion" / "bundle").is_dir():
            config = load_config("train_diffusion", diffusion_overrides)
            train_unet(config, out / "latents", out / "diffusion", diffusion_overrides, device_name=device_name)
        finish_decoder_fine_tune(decoder, decoder_run)
    finally:
        torch.set_num_threads(threads)
        if decoder is not None and decoder.poll() is None:
            decoder.terminate()  # it saves a checkpoint at its next step; a re-run resumes from there
            try:
                decoder.wait(timeout=120)
            except subprocess.TimeoutExpired:
                decoder.kill()
    tuned = load_bundle(decoder_run / "bundle", kind="autoencoder")
    if load_bundle(out / "diffusion" / "bundle").meta["autoencoder"]["content_hash"] != tuned.content_hash:
        replace_autoencoder(out / "diffusion" / "bundle", tuned)
    tuned_vae = autoencoder_report(decoder_run, "with the fine-tuned decoder")
    _done(started, timings, "train-diffusion")

    model = out / "diffusion"
    started = _stage(5, "ldm sample: prompt grid, incl. colour/shape pairs never seen together")
    grid = prompt_grid(model, out / "samples", GRID_PROMPTS, device_name)
    typer.echo(f"      grid: {grid}")
    _done(started, timings, "sample")

    started = _stage(6, "ldm img2img: one training image, turned blue at several strengths")
    strip = img2img_strip(model, data / "00000.png", out / "img2img", device_name)
    typer.echo(f"      strip: {strip}")
    _done(started, timings, "img2img")

    started = _stage(7, f"prompt adherence: {PRESET['adherence_prompts']} random prompts and {PRESET['held_out_prompts']} for the held-out pairs, scored by a shape classifier")
    scores = adherence(model, out / "adherence", device_name)
    _done(started, timings, "adherence")

    summary = {
        "vae": tuned_vae,
        "vae_before_decoder_fine_tune": first_vae,
        "adherence": scores,
        "seconds": timings,
        "total_seconds": time.perf_counter() - total_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
