"""txt2img speed: our SamplingPipeline beside diffusers' StableDiffusionPipeline on identical weights.

One random latent-diffusion model (CLIP text encoder, U-Net, KL autoencoder) is written as our bundle;
diffusers' pipeline gets the same weights (our parameter names are diffusers'), the same DDIM
schedule (SD's: leading spacing, steps_offset 1), steps, guidance scale, size and initial noise.
Both are timed in the same run, interleaved; the k-th call of every case uses the same prompt and
seed, so the last images of each case are compared (PSNR). bf16: ours keeps its U-Net weights in
bf16; diffusers runs under torch.autocast(bf16), for reference. `--compile` adds ours with
`compile=true` (torch.compile, weights frozen), timed after its one-time compilation, which is
reported separately with the number of images after which it has paid for itself. A second table sets one U-Net
forward's achieved GFLOP/s against a plain 2048^3 matmul measured in the same run.

    python scripts/bench_sample.py                          # small U-Net, 16x16 latents, 20 steps
    python scripts/bench_sample.py --compile                # also ours with compile=true
    python scripts/bench_sample.py --preset sd15 --device cuda
    python scripts/bench_sample.py --preset sd15 --process   # whole processes, fixed costs broken out (CPU default)

`--process` (the default for sd15 on the CPU) runs every case as a user would, a fresh interpreter from
start to PNG (`_bench_process.py`): txt2img at the preset's size in each precision, and in float32 a
non-square txt2img and an img2img; each case's fixed costs are broken out, its steps timed, and its
peak RSS taken, beside diffusers' StableDiffusionPipeline loaded with from_pretrained from the same
weights saved by diffusers; each side's step is also given as GFLOP/s and as a share of the host's fp32
matmul, the ceiling its layers could reach.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402
import _bench_process as process  # noqa: E402

from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL, downsampling_factor  # noqa: E402
from ldm_cli.bundle import load_bundle, write_bundle  # noqa: E402
from ldm_cli.config import from_dict, to_dict  # noqa: E402
from ldm_cli.diffusion.load import LatentDiffusion, load_latent_diffusion, write_latent_diffusion_bundle  # noqa: E402
from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from ldm_cli.diffusion.text import TextEncoder, TextEncoderConfig, load_text_encoder, save_text_encoder  # noqa: E402
from ldm_cli.backends.cpu import FusedSelfAttention, optimize_for_cpu, optimize_for_cpu_inference  # noqa: E402
from ldm_cli.backends.guided import CachedTimeProjection, GuidedUNet  # noqa: E402
from ldm_cli.diffusion.transformer import TransformerBlock  # noqa: E402
from ldm_cli.diffusion.unet import UNet  # noqa: E402
from ldm_cli.diffusion.unet_config import UNetConfig  # noqa: E402
from ldm_cli.eval.metrics import psnr  # noqa: E402
from ldm_cli.sampling.denoiser import get_sigmas  # noqa: E402
from ldm_cli.noise import initial_noise  # noqa: E402
from ldm_cli.sampling.pipeline import ImageJob, SamplingPipeline  # noqa: E402
from ldm_cli.sampling.settings import SamplingSettings  # noqa: E402

LATENT_SCALE = 0.18215  # SD's; diffusers' vae.config.scaling_factor is set to the same
SPACING = "leading"  # diffusers' DDIMScheduler with SD's steps_offset=1
# one forward is ~50 ms on a 2-core CPU: many cheap repeats steady the median on a shared machine
FORWARD_REPEATS = 20
SD_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True,
               clip_sample=False, steps_offset=1, timestep_spacing=SPACING)


@dataclass
class Preset:
    unet: str  # configs/unet/<name>.yaml (cross_attention_dim set to the text width)
    autoencoder: str  # configs/autoencoder/<name>.yaml
    text_width: int
    text_layers: int
    resolution: int
    repeats: int
    description: str


PRESETS = {
    "tiny": Preset("tiny", "tiny", 128, 2, 32, 5, "U-Net tiny.yaml, autoencoder tiny.yaml (f4), 32 px"),
    "small": Preset("small", "tiny", 384, 4, 64, 3, "U-Net small.yaml (41M), autoencoder tiny.yaml (f4), 64 px -> 16x16 latents"),
    "sd15": Preset("sd15", "kl_f8", 768, 12, 512, 3, "SD-1.5 U-Net, kl-f8, CLIP-L-sized text encoder, 512 px"),
}
PROCESS_STEPS = 4  # measured DDIM steps per whole-process case: the first, and three to take a median of
IMG2IMG_STRENGTH = 0.6
PROJECTED_STEPS = 25  # whole-process times are also given at this many steps: fixed part + steps x median step


@dataclass
class Payload:
    """Everything a (possibly spawned) process needs to rebuild the cases."""

    bundle: str
    resolution: int
    batch_size: int
    steps: int
    guidance_scale: float
    seed: int
    device: str


# --------------------------------------------------------------------------------- the random model



def random_text_encoder(width: int, layers: int) -> TextEncoder:
    """A CLIP text tower of the given width with random weights, on the byte-level tiny CLIP tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_text_encoder(TextEncoderConfig(tiny=True)).tokenizer
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return TextEncoder(CLIPTextModel(config).eval(), tokenizer, max_length=77)


def write_random_model(directory: Path, preset: Preset, resolution: int, seed: int) -> Path:
    """A complete random latent-diffusion bundle (our format) for `preset`; returns its path."""
    torch.manual_seed(seed)
    autoencoder_config = bench.load_yaml("autoencoder", preset.autoencoder, AutoencoderConfig)
    autoencoder = write_bundle(
        directory / "autoencoder", "autoencoder", {"autoencoder": AutoencoderKL(autoencoder_config).state_dict()},
        {"autoencoder": to_dict(autoencoder_config), "latent_scale": LATENT_SCALE, "latent_shift": 0.0, "resolution": resolution},
    )
    text_encoder = random_text_encoder(preset.text_width, preset.text_layers)
    text_config = TextEncoderConfig(pretrained=str(save_text_encoder(text_encoder, directory / "text_encoder")), max_length=77)
    unet_config = bench.load_yaml("unet", preset.unet, UNetConfig)
    unet_config.cross_attention_dim = preset.text_width
    return write_latent_diffusion_bundle(
        directory / "model", UNet(unet_config).state_dict(), unet_config, ScheduleConfig(), text_config, text_encoder, autoencoder
    ).path


def diffusers_pipeline(model: LatentDiffusion, device: torch.device):
    """diffusers' StableDiffusionPipeline holding our model's weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    config = model.autoencoder.model.config
    levels = len(config.block_out_channels)
    vae = DiffusersAutoencoderKL(
        in_channels=config.in_channels, out_channels=config.out_channels, latent_channels=config.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, mid_block_add_attention=config.mid_block_add_attention,
        scaling_factor=model.autoencoder.latent_scale,
    )
    vae.load_state_dict(model.autoencoder.model.state_dict(), strict=True)
    unet = UNet2DConditionModel(**model.unet.config.to_diffusers_config())
    unet.load_state_dict(model.unet.state_dict(), strict=True)
    pipeline = StableDiffusionPipeline(
        vae=vae.eval(), unet=unet.eval(), text_encoder=model.text_encoder.model, tokenizer=model.text_encoder.tokenizer,
        scheduler=DDIMScheduler(**SD_DDIM), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ------------------------------------------------------------------------------------------- cases


class Generate:
    """One case's txt2img call. Its k-th call uses prompt k and the same seeds in every case, so the
    cases' last images can be compared; `last` keeps them ([B, 3, H, W] in [-1, 1], CPU float32)."""

    def __init__(self, make_images: Callable[[list[str], list[int]], torch.Tensor], batch_size: int, seed: int,
                 pipeline: SamplingPipeline | None = None) -> None:
        self.make_images, self.batch_size, self.seed = make_images, batch_size, seed
        self.pipeline = pipeline  # ours: kept so that its compiled U-Net can be timed on its own too
        self.calls = 0
        self.last: torch.Tensor | None = None

    def __call__(self) -> None:
        prompts = [f"a photograph of object number {self.calls}"] * self.batch_size
        self.last = self.make_images(prompts, [self.seed + i for i in range(self.batch_size)])
        self.calls += 1


def settings_for(payload: Payload) -> SamplingSettings:
    return SamplingSettings(steps=payload.steps, guidance_scale=payload.guidance_scale, sampler="ddim",
                            timestep_spacing=SPACING, height=payload.resolution, width=payload.resolution)


def build_ours(payload: Payload, precision: str, compile: bool = False) -> Generate:
    device = torch.device(payload.device)
    pipeline = SamplingPipeline(load_latent_diffusion(payload.bundle, device), device, precision, compile=compile)
    settings = settings_for(payload)
    return Generate(lambda prompts, seeds: pipeline([ImageJob(p, s) for p, s in zip(prompts, seeds)], settings),
                    payload.batch_size, payload.seed, pipeline)


def build_diffusers(payload: Payload, precision: str) -> Generate:
    device = torch.device(payload.device)
    model = load_latent_diffusion(payload.bundle)
    pipeline = diffusers_pipeline(model, device)
    latent_shape = (model.latent_channels, payload.resolution // model.downsampling_factor,
                    payload.resolution // model.downsampling_factor)
    # ours starts at x = σ_0 ε; diffusers' DDIM at the VP state x_T = x / sqrt(σ_0² + 1): the same ε, rescaled
    sigma_max = get_sigmas(model.schedule, payload.steps, SPACING)[0].item()
    del model
    context = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def make_images(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        noise = torch.stack([initial_noise(seed, latent_shape) for seed in seeds])
        with context, torch.inference_mode():
            images = pipeline(prompts, num_inference_steps=payload.steps, guidance_scale=payload.guidance_scale,
                              latents=(noise * sigma_max / math.sqrt(sigma_max**2 + 1)).to(device),
                              height=payload.resolution, width=payload.resolution, output_type="pt").images
        return images.float().cpu() * 2 - 1  # [0, 1] -> [-1, 1], as ours

    return Generate(make_images, payload.batch_size, payload.seed)


def build_case(payload: Payload, name: str) -> Generate:
    side, precision, *compiled = name.split(" ")  # "ours fp32", "diffusers bf16", "ours bf16 compiled"
    if side == "ours":
        return build_ours(payload, precision, compile=bool(compiled))
    return build_diffusers(payload, precision)


# ----------------------------------------------------------------------------------- U-Net GFLOP/s


def layers_as_matmuls(call: Callable[[], Any], unet: torch.nn.Module, dtype: torch.dtype) -> tuple[Callable[[], Any], int]:
    """Every convolution and linear that one `call` runs in `unet`, as a plain matmul with the same
    multiply-adds (rows: output pixels or tokens; inner size: inputs per output), each with its own
    weight, packed for oneDNN on the CPU as ours are: how fast the forward's shapes can multiply, apart
    from everything else it does (norms, attention, element-wise ops, dispatch). (call, its FLOPs)."""
    shapes: list[tuple[int, int, int]] = []

    def record(layer: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        outputs = layer.weight.shape[0]
        shapes.append((output.numel() // outputs, layer.weight[0].numel(), outputs))

    layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not isinstance(m, CachedTimeProjection)]
    hooks = [layer.register_forward_hook(record) for layer in layers]
    call()
    for hook in hooks:
        hook.remove()
    device = next(unet.parameters()).device
    layers = torch.nn.ModuleList(torch.nn.Linear(inner, outputs, bias=False, device=device, dtype=dtype) for _, inner, outputs in shapes)
    inputs = [torch.randn(rows, inner, device=device, dtype=dtype) for rows, inner, _ in shapes]
    if device.type == "cpu":
        optimize_for_cpu_inference(layers)

    def run() -> None:
        for layer, rows in zip(layers, inputs):
            layer(rows)

    return run, sum(2 * rows * inner * outputs for rows, inner, outputs in shapes)


def unet_forwards(
    payload: Payload, device: torch.device, precisions: list[str], compiled: dict[str, SamplingPipeline]
) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    """One guided U-Net forward (batch 2B) per case, and plain matmuls as the reference: (calls, FLOPs of each).
    `compiled`: the already compiled pipelines of the "ours <precision> compiled" cases."""
    model = load_latent_diffusion(payload.bundle, device)
    factor = model.downsampling_factor
    batch = 2 * payload.batch_size  # classifier-free guidance: [uncond, cond]
    generator = torch.Generator().manual_seed(payload.seed)
    side = payload.resolution // factor
    x = torch.randn(batch, model.latent_channels, side, side, generator=generator).to(device)
    context = torch.randn(batch, 77, model.unet.config.cross_attention_dim, generator=generator).to(device)
    t = torch.full((batch,), 500.0, device=device)
    diffusers_unet = diffusers_pipeline(model, device).unet
    calls: dict[str, Callable[[], Any]] = {}
    flops: dict[str, int] = {}

    def pipeline_call(pipeline: SamplingPipeline) -> Callable[[], Any]:
        # our pipeline's U-Net call as it samples: weights in the compute dtype, channels_last (packed for
        # oneDNN on the CPU), the text's cross-attention keys and values and the step's time projections
        # computed once per run, and the latent once for both texts (the layers before the first
        # cross-attention run once)
        sigma = pipeline.denoiser.t_to_sigma(t[:1]).cpu()
        with torch.inference_mode():
            pipeline.begin_run(context, torch.cat([sigma, sigma.new_zeros(1)]))
        key = float(sigma[0])
        return lambda: pipeline._unet(x[: payload.batch_size], t[: payload.batch_size], key, context)

    with torch.inference_mode():
        for precision in precisions:
            name = f"ours U-Net {precision}"
            # FLOPs of the plain eager forward: FlopCounterMode does not count oneDNN's packed-weight ops
            plain = SamplingPipeline(load_latent_diffusion(payload.bundle, device), device, precision, prepack=False)
            flops[name] = bench.count_flops(pipeline_call(plain))
            for block in plain.model.unet.modules():
                if isinstance(block, TransformerBlock):
                    block.attn1 = FusedSelfAttention(block.attn1)  # the shapes packed sampling runs
            matmuls = f"ours U-Net layers as matmuls {precision}"
            calls[matmuls], flops[matmuls] = layers_as_matmuls(pipeline_call(plain), plain.model.unet, plain.unet_dtype)
            del plain
            calls[name] = pipeline_call(SamplingPipeline(load_latent_diffusion(payload.bundle, device), device, precision))
        calls["diffusers U-Net fp32"] = lambda: diffusers_unet(x, t, encoder_hidden_states=context, return_dict=False)
        flops["diffusers U-Net fp32"] = bench.count_flops(calls["diffusers U-Net fp32"])
        for name, pipeline in compiled.items():  # the eager forward's FLOPs: compiled kernels are not counted
            precision = name.split(" ")[1]
            calls[f"ours U-Net {precision} compiled"] = pipeline_call(pipeline)
            flops[f"ours U-Net {precision} compiled"] = flops[f"ours U-Net {precision}"]
    for precision in sorted({"fp32", *precisions}, reverse=True):  # fp32: the reference of every share
        matmul, matmul_flops = bench.matmul_call(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
        calls[f"matmul 2048^3 {precision}"] = matmul
        flops[f"matmul 2048^3 {precision}"] = matmul_flops
    return calls, flops


def step_flops(ours: Path, theirs: Path, height: int, width: int) -> dict[str, int]:
    """FLOPs of one guided denoising step at `height` x `width` for each side, counted by FlopCounterMode on
    the meta device (shapes only: no weights, no memory): ours as packed sampling runs it (the layers before
    the first cross-attention once for both texts, fused q/k/v, text keys/values and time projections
    cached per run), diffusers' U-Net on the batch of [uncond, cond]."""
    from diffusers import UNet2DConditionModel

    meta = load_bundle(ours, kind="latent-diffusion").meta
    autoencoder = from_dict(load_bundle(ours / meta["autoencoder"]["path"]).meta["autoencoder"], AutoencoderConfig)
    factor = downsampling_factor(autoencoder)
    latent = (height // factor, width // factor)
    with torch.device("meta"):
        unet = UNet(from_dict(meta["unet"], UNetConfig)).eval()
        optimize_for_cpu(unet)
        guided = GuidedUNet(unet)
        for block in unet.modules():
            if isinstance(block, TransformerBlock):
                block.attn1 = FusedSelfAttention(block.attn1)  # what packed sampling runs
        theirs_unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(theirs / "unet")).eval()
        channels, width_text = unet.config.in_channels, unet.config.cross_attention_dim
        x, t = torch.zeros(1, channels, *latent), torch.full((1,), 500.0)
        text = torch.zeros(2, 77, width_text)
    with torch.inference_mode():
        guided.begin_run(text, t, [1.0], torch.float32)
        flops = {"ours": bench.count_flops(lambda: guided(x, t, 1.0)),
                 "diffusers": bench.count_flops(lambda: theirs_unet(torch.cat([x] * 2), torch.cat([t] * 2), encoder_hidden_states=text))}
    return flops


def matmul_peak(threads: int | None, repeats: int = 5) -> float:
    """The host's fp32 GFLOP/s on one large matmul (the best of `repeats`): the ceiling a step's layers can reach."""
    if threads:
        torch.set_num_threads(threads)
    call, flops = bench.matmul_call(torch.device("cpu"), torch.float32, size=4096)
    call()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    bench.add_common_arguments(parser, {name: preset.description for name, preset in PRESETS.items()}, "small",
                               steps_means_repeats=False)
    parser.add_argument("--steps", "--sampling-steps", dest="sampling_steps", type=int, default=None,
                        help=f"DDIM steps per image (default 20; {PROCESS_STEPS} with --process)")
    parser.add_argument("--process", action=argparse.BooleanOptionalAction, default=None,
                        help="time whole processes, start to PNG, with fixed costs broken out (default: sd15 on the CPU)")
    parser.add_argument("--models", type=Path, default=None,
                        help="--process: keep the random models in this folder and reuse them (default: a scratch folder)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with compile=true (torch.compile; compiles once, reported separately)")
    parser.add_argument("--forward-repeats", type=int, default=FORWARD_REPEATS,
                        help=f"measured calls per case of the U-Net forward table (default {FORWARD_REPEATS})")
    parser.add_argument("--memory-steps", type=int, default=2,
                        help="DDIM steps of the memory measurement's call (the peak does not grow with steps; default 2)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    device = bench.setup(args)
    chosen = bench.precisions(args.precision)
    if args.process if args.process is not None else (args.preset == "sd15" and device.type == "cpu"):
        if device.type != "cpu":
            raise SystemExit("--process measures CPU processes; use it with --device cpu")
        if bench.emulate_bf16(device) and args.precision == "both":
            chosen = ["fp32"]
            print("note: fp32 only: this CPU has no native bf16, where a bf16 SD-1.5 step takes hours "
                  "(compare bf16 with --precision bf16, slowly)")
        return run_processes(args, preset, chosen)
    args.sampling_steps = args.sampling_steps or 20
    names = [f"{side} {precision}" for precision in chosen for side in ("ours", "diffusers")]
    compiled = [f"ours {precision} compiled" for precision in chosen] if args.compile else []
    repeats = args.repeats or preset.repeats

    with tempfile.TemporaryDirectory(prefix="bench-sample-") as scratch:
        resolution = args.resolution or preset.resolution
        payload = Payload(str(write_random_model(Path(scratch), preset, resolution, args.seed)), resolution,
                          args.batch_size or 1, args.sampling_steps, args.guidance_scale, args.seed, str(device))
        unet_parameters = sum(p.numel() for p in load_latent_diffusion(payload.bundle).unet.parameters())
        print(f"model: U-Net {preset.unet} ({unet_parameters / 1e6:.1f}M params, context 77x{preset.text_width}), "
              f"autoencoder {preset.autoencoder}, {payload.resolution}x{payload.resolution} px, batch {payload.batch_size}; "
              f"DDIM {payload.steps} steps, guidance {payload.guidance_scale}; {repeats} measured calls per case after "
              f"{args.warmup} warm-up, interleaved, median\n")

        print("timing ...", flush=True)
        cases = {name: build_case(payload, name) for name in names + compiled}
        compile_seconds = {}
        for name in compiled:
            print(f"compiling {name} ...", flush=True)
            start = time.perf_counter()
            cases[name]()  # the first call compiles
            compile_seconds[name] = time.perf_counter() - start
            cases[name].calls = 0  # the k-th timed call of every case makes the same images
        timings = bench.interleaved_timings(cases, repeats, args.warmup, device)
        images = {name: case.last for name, case in cases.items()}
        compiled_pipelines = {name: cases[name].pipeline for name in compiled}
        del cases
        print("U-Net forward GFLOP/s ...", flush=True)
        forwards, flops = unet_forwards(payload, device, chosen, compiled_pipelines)
        del compiled_pipelines
        with torch.inference_mode():
            forward_timings = bench.interleaved_timings(forwards, max(repeats, args.forward_repeats), 1, device)
        del forwards
        memory: dict = {}
        if not args.no_memory:
            print("peak memory (a fresh process per case) ...\n" if device.type == "cpu" else "peak memory ...\n", flush=True)
            memory_payload = Payload(**{**payload.__dict__, "steps": args.memory_steps})
            memory = bench.measure_memory(names, build_case, memory_payload, args.warmup, device)

    report(payload, names + compiled, timings, images, memory, device)
    report_compilation(payload, compile_seconds, timings)
    report_gflops(forward_timings, flops)
    report_summary(names + compiled, timings, images, memory, forward_timings, flops)
    if device.type == "cpu":
        print("note: on a shared CPU these timings are noisy; rerun with more --repeats before drawing conclusions")


# -------------------------------------------------------------------------------- whole processes


def prepare_models(folder: Path, preset: Preset, resolution: int, seed: int) -> tuple[Path, Path]:
    """Our bundle and diffusers' save_pretrained folder of the same random weights, made once per folder,
    in a spawned process so that this one stays small while the cases run."""
    ours, theirs = folder / "ldm", folder / "diffusers"
    if not (ours / "model" / "bundle.json").is_file() or not (theirs / "model_index.json").is_file():
        import multiprocessing

        writer = multiprocessing.get_context("spawn").Process(target=write_models, args=(ours, theirs, preset, resolution, seed))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the random models failed (exit {writer.exitcode})")
    return ours / "model", theirs


def write_models(ours: Path, theirs: Path, preset: Preset, resolution: int, seed: int) -> None:
    if not (ours / "model" / "bundle.json").is_file():
        print(f"writing the random {preset.unet} model to {ours.parent} ...", flush=True)
        write_random_model(ours, preset, resolution, seed)
    if not (theirs / "model_index.json").is_file():
        diffusers_pipeline(load_latent_diffusion(ours / "model"), torch.device("cpu")).save_pretrained(theirs)


def init_image(folder: Path, height: int, width: int) -> Path:
    """scikit-image's astronaut photo, resized: the img2img cases' init image."""
    from PIL import Image
    from skimage.data import astronaut

    path = folder / f"init-{width}x{height}.png"
    if not path.is_file():
        Image.fromarray(astronaut()).resize((width, height), Image.LANCZOS).save(path)
    return path


def process_cases(args: argparse.Namespace, ours: Path, theirs: Path, scratch: Path, chosen: list[str]) -> list[process.ProcessCase]:
    """txt2img at the preset's size in each precision; in float32 (the first precision chosen) also a
    non-square txt2img (1.5x the width) and an img2img at IMG2IMG_STRENGTH. Ours and diffusers' alternate."""
    side = args.resolution or PRESETS[args.preset].resolution
    schedule = NoiseSchedule(from_dict(load_bundle(ours, kind="latent-diffusion").meta["schedule"], ScheduleConfig))
    sigma_max = get_sigmas(schedule, args.sampling_steps, SPACING)[0].item()
    shapes = [(precision, side, side, None) for precision in chosen]
    shapes += [(chosen[0], side, side * 3 // 2, None), (chosen[0], side, side, init_image(scratch, side, side))]
    cases = []
    for precision, height, width, init in shapes:
        # img2img walks the last `strength` of its schedule: it gets the schedule that makes it denoise as many steps
        steps = math.ceil(args.sampling_steps / IMG2IMG_STRENGTH) if init else args.sampling_steps
        for name, model in (("ours", ours), ("diffusers", theirs)):
            case = process.ProcessCase(
                name, precision, str(model), height, width, steps, args.guidance_scale, args.seed, "",
                args.threads, str(init) if init else None, IMG2IMG_STRENGTH, sigma_max,
            )
            case.out = str(scratch / case.name.replace(" ", "-"))
            cases.append(case)
    return cases


def run_processes(args: argparse.Namespace, preset: Preset, chosen: list[str]) -> None:
    args.sampling_steps = args.sampling_steps or PROCESS_STEPS
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-process-")))
        folder = args.models or scratch / "models"
        ours, theirs = prepare_models(folder, preset, args.resolution or preset.resolution, args.seed)
        cases = process_cases(args, ours, theirs, scratch, chosen)
        repeats = args.repeats or 1
        print(f"model: U-Net {preset.unet}, autoencoder {preset.autoencoder}, CLIP text encoder "
              f"{preset.text_layers}x{preset.text_width} (random weights); "
              f"DDIM {args.sampling_steps} steps, guidance {args.guidance_scale}; each case a fresh process, its weight "
              f"files read into the page cache first, {repeats} run(s) each (the fastest kept), cases alternating "
              f"ours / diffusers\n", flush=True)
        flops = {(case.height, case.width): step_flops(ours, theirs, case.height, case.width) for case in cases}
        peak = matmul_peak(args.threads)
        results: dict[str, process.ProcessResult] = {}
        for round_ in range(repeats):
            for case in cases:
                print(f"  {case.name} ...", flush=True)
                result = process.run_case(case)
                if result.error:
                    raise SystemExit(f"{case.name} failed: {result.error}")
                if case.name not in results or result.wall < results[case.name].wall:
                    results[case.name] = result
        peak = max(peak, matmul_peak(args.threads))  # the better of before and after the cases: load varies
        report_processes(results, args.sampling_steps, flops, peak)


def report_processes(results: dict[str, process.ProcessResult], steps: int, flops: dict[tuple[int, int], dict[str, int]],
                     matmul_gflops: float) -> None:
    rows = []
    for name, result in results.items():
        phases = result.phases
        step_gflop = flops[result.case.height, result.case.width][result.case.side] / 1e9
        peer = results.get(name.replace("ours", "diffusers", 1)) if name.startswith("ours") else None
        projected = result.at_steps(PROJECTED_STEPS)
        rows.append([
            name, f"{result.wall:.1f}", f"{phases['import']:.1f}", f"{phases['load']:.1f}", f"{phases['text']:.2f}",
            f"{result.first_step_setup:.1f}", f"{phases['steps']:.2f}", f"{phases['decode']:.1f}", f"{result.fixed():.1f}",
            f"{projected:.0f}", bench.ratio(projected, peer.at_steps(PROJECTED_STEPS)) if peer else "",
            bench.mib(result.peak_rss), bench.ratio(result.peak_rss, peer.peak_rss) if peer else "",
            f"{step_gflop:.1f}", f"{step_gflop / phases['steps']:.0f}", f"{100 * step_gflop / phases['steps'] / matmul_gflops:.0f}%",
        ])
    bench.print_table(["case", f"wall s ({steps} steps)", "import", "load", "text", "1st-step set-up", "s/step", "decode",
                       "fixed", f"s at {PROJECTED_STEPS} steps", "vs diffusers", "peak MiB", "vs diffusers",
                       "GFLOP/step", "GFLOP/s", "of matmul"], rows)
    print(f"\nseconds; 'fixed' = the whole process minus its steps' median time ({steps} denoising steps measured): start-up, "
          f"import, load, text (img2img: and the init image's encoding), first-step set-up, decode, PNG; 's at "
          f"{PROJECTED_STEPS} steps' = fixed + {PROJECTED_STEPS} x s/step (img2img: {PROJECTED_STEPS} denoising steps too); "
          "'vs diffusers' = ours / diffusers' for the same precision, mode and size (lower is better); peak = the "
          "process's peak RSS; GFLOP/step = one guided step's FLOPs (FlopCounterMode; ours runs the layers before the "
          "first cross-attention once for both texts), GFLOP/s = that / s/step, 'of matmul' = that / the host's "
          f"fp32 4096^3 matmul in this run ({matmul_gflops:.0f} GFLOP/s): how near each step is to the machine's ceiling")
    pictures = {name: process.pixels(result) for name, result in results.items() if "img2img" not in name}
    for a, b in (("ours fp32", "diffusers fp32"), ("ours bf16", "ours fp32"), ("diffusers bf16", "diffusers fp32")):
        for name in [n for n in pictures if n.startswith(a + " txt2img")]:
            other = name.replace(a, b, 1)
            if other in pictures:
                print(f"PSNR {name} vs {other}: {image_psnr(pictures[name], pictures[other]):.1f} dB")
    fp32 = [r for n, r in results.items() if n.startswith("ours fp32 txt2img")]
    bf16 = [r for n, r in results.items() if n.startswith("ours bf16 txt2img")]
    if fp32 and bf16:
        print(f"ours bf16 peak RSS / ours fp32 peak RSS: {bf16[0].peak_rss / fp32[0].peak_rss:.2f}")


def image_psnr(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    return float(psnr(a, b).mean()) if a is not None and b is not None else float("nan")


def _psnr_text(a: torch.Tensor | None, b: torch.Tensor | None, reference: str) -> str:
    return "n/a" if a is None or b is None else f"{image_psnr(a, b):.1f} vs {reference}"


def report(payload: Payload, names: list[str], timings: dict, images: dict, memory: dict, device: torch.device) -> None:
    diffusers_fp32 = timings.get("diffusers fp32")
    rows = []
    for name in names:
        seconds = timings[name].median / payload.batch_size
        if name.endswith(" compiled"):
            reference = name.removesuffix(" compiled")  # compiled kernels round differently from eager ones
        else:
            reference = "diffusers fp32" if name == "ours fp32" else "ours fp32"
        rows.append([
            name, f"{seconds:.3f}", f"{timings[name].best / payload.batch_size:.3f}",
            bench.ratio(timings[name].median, diffusers_fp32.median) if diffusers_fp32 else "n/a",
            _psnr_text(images[name], images.get(reference), reference), bench.mib(memory.get(name)),
        ])
    bench.print_table(["case", "s/image", "min s/image", "time vs diffusers fp32", "PSNR dB", "peak MiB"], rows)
    spread = ", ".join(f"{name} {images[name].std():.2f}" for name in names if images[name] is not None)
    print("\n'time vs diffusers fp32' = this case's seconds per image / diffusers fp32's (lower is faster); "
          f"PSNR of the last images, same prompt and seed (pixel std, to show they are pictures: {spread})")
    if memory:
        print(bench.memory_note(device) + "; memory calls use --memory-steps DDIM steps")


def report_compilation(payload: Payload, compile_seconds: dict[str, float], timings: dict) -> None:
    for name, seconds in compile_seconds.items():
        eager, compiled = timings[name.removesuffix(" compiled")].median, timings[name].median
        one_time = seconds - compiled  # the first call minus an ordinary one
        saved = eager - compiled  # per call of `batch` images
        paid = f"pays for itself after {math.ceil(one_time / saved * payload.batch_size)} images" if saved > 0 else "never pays"
        print(f"{name}: compiling took {one_time:.0f} s once; {eager / compiled:.2f}x faster per image after that; {paid}")


def gflops(timings: dict, flops: dict[str, int], name: str) -> float:
    return flops[name] / timings[name].median / 1e9


def report_gflops(timings: dict, flops: dict[str, int]) -> None:
    print("\nU-Net forward (batch of [uncond, cond]); GFLOP by FlopCounterMode, ours without the text's "
          "cross-attention keys and values and the resnets' time projections, which sampling computes once per image")
    rows = []
    for name, timing in timings.items():
        matmul = f"matmul 2048^3 {name.removesuffix(' compiled').rsplit(' ', 1)[1]}"
        rows.append([name, f"{timing.median * 1e3:.1f}", f"{flops[name] / 1e9:.2f}", f"{gflops(timings, flops, name):.0f}",
                     f"{100 * gflops(timings, flops, name) / gflops(timings, flops, matmul):.0f}%"])
    bench.print_table(["call", "ms", "GFLOP", "GFLOP/s", "of matmul at its precision"], rows)


def report_summary(names, timings, images, memory, forward_timings, flops) -> None:
    print("\nsummary (time ratios: lower is faster):")
    for name in names:
        if name.startswith("ours") and "diffusers fp32" in timings:
            relative = timings[name].median / timings["diffusers fp32"].median
            print(f"  {name} time / diffusers fp32: {relative:.2f}; output PSNR vs diffusers fp32 "
                  f"{image_psnr(images[name], images['diffusers fp32']):.1f} dB")
    if "ours bf16" in images and "ours fp32" in images:
        print(f"  ours bf16 output vs ours fp32: {image_psnr(images['ours bf16'], images['ours fp32']):.1f} dB")
    for name in names:
        if name.startswith("ours") and memory.get(name) and memory.get(name.replace("ours", "diffusers")):
            print(f"  {name} peak memory / diffusers': {memory[name] / memory[name.replace('ours', 'diffusers')]:.2f}")
    for name in ("ours U-Net fp32", "ours U-Net fp32 compiled", "ours U-Net layers as matmuls fp32"):
        if name in forward_timings:
            share = gflops(forward_timings, flops, name) / gflops(forward_timings, flops, "matmul 2048^3 fp32")
            print(f"  {name} GFLOP/s vs a 2048^3 fp32 matmul: {100 * share:.0f}%")


if __name__ == "__main__":
    main()
