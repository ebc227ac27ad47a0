"""Autoencoder training throughput: our AutoencoderKL beside diffusers' AutoencoderKL, same weights, same batch.

One step = encode, sample the posterior, decode, L1 + kl_weight * KL, backward, Adam step; bf16
means torch.autocast(bf16) around the forward and the loss, for both sides. Both models get
identical weights (our state_dict loads strictly into diffusers) and are timed in the same run,
interleaved. An extra row times our real step, AutoencoderTrainer.train_step, with the
discriminator active (generator + discriminator updates; LPIPS off, its weights are not bundled).

    python scripts/bench_vae.py                              # tiny autoencoder, 32 px, batch 8
    python scripts/bench_vae.py --preset sd15 --repeats 2    # SD's kl-f8 at 256 px, batch 1
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from ldm_cli.autoencoder.loss import AutoencoderLossConfig  # noqa: E402
from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_cli.autoencoder.train import AutoencoderTrainer  # noqa: E402
from ldm_cli.config import TrainConfig, TrainVaeConfig  # noqa: E402
from ldm_cli.training.precision import autocast  # noqa: E402

KL_WEIGHT = 1e-6  # the LDM value (configs/loss/vae.yaml)


@dataclass
class Preset:
    autoencoder: str  # configs/autoencoder/<name>.yaml
    loss: str  # configs/loss/<name>.yaml (the trainer row's discriminator)
    train: str  # configs/train/<name>.yaml (the trainer row's optimizer settings and memory format)
    resolution: int
    batch_size: int
    repeats: int
    description: str


PRESETS = {
    "tiny": Preset("tiny", "vae_tiny", "vae_tiny", 32, 8, 5, "configs/autoencoder/tiny.yaml, 32 px, batch 8"),
    "small": Preset("kl_f8", "vae", "vae", 64, 2, 3, "kl-f8 (SD's VAE, 84M params), 64 px, batch 2"),
    "sd15": Preset("kl_f8", "vae", "vae", 256, 1, 2, "kl-f8 (SD's VAE, 84M params), 256 px, batch 1; slow on a CPU"),
}
SIDES = ("ours", "diffusers", "ours trainer")


@dataclass
class Payload:
    """Everything a (possibly spawned) process needs to rebuild the cases."""

    preset: Preset
    resolution: int
    batch_size: int
    seed: int
    device: str



def diffusers_autoencoder(config: AutoencoderConfig) -> torch.nn.Module:
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    levels = len(config.block_out_channels)
    return DiffusersAutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, mid_block_add_attention=config.mid_block_add_attention,
    )


def build_step(payload: Payload, side: str, precision: str) -> Callable[[], Any]:
    """One training step of (side, precision) as a closure, on the shared seed's weights and images."""
    device = torch.device(payload.device)
    config = bench.load_yaml("autoencoder", payload.preset.autoencoder, AutoencoderConfig)
    torch.manual_seed(payload.seed)
    ours = AutoencoderKL(config)
    images = torch.rand(payload.batch_size, 3, payload.resolution, payload.resolution,
                        generator=torch.Generator().manual_seed(payload.seed + 1)).mul(2).sub(1).to(device)
    if side == "ours trainer":
        return trainer_step(payload, config, ours.state_dict(), images, precision)
    if side == "ours":
        model = ours

        def forward(x: torch.Tensor, generator: torch.Generator):
            return model(x, generator=generator)
    else:
        model = diffusers_autoencoder(config)
        model.load_state_dict(ours.state_dict(), strict=True)  # parameter names are diffusers'
        del ours

        def forward(x: torch.Tensor, generator: torch.Generator):
            posterior = model.encode(x).latent_dist
            return model.decode(posterior.sample(generator)).sample, posterior

    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))  # the LDM autoencoder optimizer
    generator = torch.Generator(device).manual_seed(payload.seed)

    def step() -> torch.Tensor:
        with autocast(precision, device):
            reconstructions, posterior = forward(images, generator)
            reconstruction_loss = (images - reconstructions).abs().float().mean()
            loss = reconstruction_loss + KL_WEIGHT * posterior.kl().float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def trainer_step(
    payload: Payload, config: AutoencoderConfig, weights: dict, images: torch.Tensor, precision: str
) -> Callable[[], Any]:
    """AutoencoderTrainer.train_step as `ldm train-vae` runs it, with the GAN terms on from step 0."""
    train = replace(bench.load_yaml("train", payload.preset.train, TrainConfig), precision=precision, ema_decay=None)
    loss = replace(bench.load_yaml("loss", payload.preset.loss, AutoencoderLossConfig), perceptual_weight=0.0, disc_start=0)
    trainer = AutoencoderTrainer(TrainVaeConfig(autoencoder=config, train=train, loss=loss), None, torch.device(payload.device))
    trainer.model.load_state_dict(weights)
    batch = [{"image": images, "caption": [""] * len(images)}]
    return lambda: trainer.train_step(batch, step=1)


def build_case(payload: Payload, name: str) -> Callable[[], Any]:
    side, precision = name.rsplit(" ", 1)
    return build_step(payload, side, precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    bench.add_common_arguments(parser, {name: preset.description for name, preset in PRESETS.items()}, "tiny")
    parser.add_argument("--no-trainer", action="store_true", help="skip the AutoencoderTrainer.train_step row")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = bench.setup(args)
    payload = Payload(preset, args.resolution or preset.resolution, args.batch_size or preset.batch_size, args.seed, str(device))
    sides = SIDES[:2] if args.no_trainer else SIDES
    names = [f"{side} {precision}" for precision in bench.precisions(args.precision) for side in sides]
    repeats = args.repeats or preset.repeats

    steps = {name: build_case(payload, name) for name in names}
    parameters = sum(p.numel() for p in AutoencoderKL(bench.load_yaml("autoencoder", preset.autoencoder, AutoencoderConfig)).parameters())
    print(f"autoencoder {preset.autoencoder}: {parameters / 1e6:.1f}M parameters, images {payload.batch_size}x3x"
          f"{payload.resolution}x{payload.resolution}; {repeats} measured steps per case after {args.warmup} warm-up, "
          "interleaved, median\n")
    print("timing ...", flush=True)
    flops = {side: bench.count_flops(steps[f"{side} {bench.precisions(args.precision)[0]}"]) for side in sides if side != "diffusers"}
    flops["diffusers"] = flops["ours"]  # same architecture, same batch
    timings = bench.interleaved_timings(steps, repeats, args.warmup, device)
    del steps
    memory: dict = {}
    if not args.no_memory:
        print("peak memory (a fresh process per case) ...\n" if device.type == "cpu" else "peak memory ...\n", flush=True)
        memory = bench.measure_memory(names, build_case, payload, args.warmup, device)

    rows = []
    for name in names:
        side, precision = name.rsplit(" ", 1)
        seconds = timings[name].median
        reference = timings[f"diffusers {precision}"].median
        rows.append([
            name, f"{seconds * 1e3:.1f}", f"{timings[name].best * 1e3:.1f}", f"{payload.batch_size / seconds:.1f}",
            bench.ratio(reference, seconds) if side != "diffusers" else "", f"{flops[side] / seconds / 1e9:.0f}",
            bench.mib(memory.get(name)), bench.ratio(memory[name], memory[f"diffusers {precision}"])
            if side != "diffusers" and memory.get(name) and memory.get(f"diffusers {precision}") else "",
        ])
    bench.print_table(["case", "ms/step", "min ms", "images/s", "vs diffusers", "GFLOP/s", "peak MiB", "mem vs diffusers"], rows)
    print(f"\none step = {flops['ours'] / 1e9:.1f} GFLOP (FlopCounterMode, forward + backward); 'vs diffusers' = "
          "diffusers' step time / ours at the same precision (higher is faster)")
    if "ours trainer" in sides:
        print(f"'ours trainer' = AutoencoderTrainer.train_step (train/{preset.train}.yaml, loss/{preset.loss}.yaml with "
              f"perceptual_weight=0, disc_start=0): also updates the discriminator ({flops['ours trainer'] / 1e9:.1f} GFLOP)")
    if memory:
        print(bench.memory_note(device))
    if device.type == "cpu":
        print("note: on a shared CPU these timings are noisy; rerun with more --repeats before drawing conclusions")


if __name__ == "__main__":
    main()
