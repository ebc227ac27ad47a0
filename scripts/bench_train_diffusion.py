"""U-Net training throughput: our UNet beside diffusers' UNet2DConditionModel, same weights, same batch.

One step = draw noise and timesteps, noise the latents, predict ε with the text context, MSE,
backward, AdamW step, at fp32 or bf16 mixed precision. Each side
trains as its own training code does: ours as `ldm train-diffusion` (fused AdamW; the memory format
and, at bf16, autocast or bf16 weights + float32 masters as the preset's configs/train file says),
diffusers as its train_text_to_image.py example (default torch.optim.AdamW, NCHW, autocast). Both
models get identical weights (our state_dict loads strictly into diffusers) and are timed in the
same run, interleaved. `--variants` flips one of ours' settings at a time.

    python scripts/bench_train_diffusion.py                      # tiny U-Net, 8x8 latents, batch 64
    python scripts/bench_train_diffusion.py --preset small --repeats 3
    python scripts/bench_train_diffusion.py --preset sd15 --device cuda --variants
    python scripts/bench_train_diffusion.py --preset sd15 --markdown    # on the CPU: fp32, minutes (see below)
    python scripts/bench_train_diffusion.py --preset small --lora           # LoRA steps: ours (peft, as
        `ldm train-lora`) beside diffusers + peft (`add_adapter`), same rank and targets; plus our full
        fine-tune step for the memory ratio
    python scripts/bench_train_diffusion.py --preset sd15 --memory      # peak memory per optimiser
    python scripts/bench_train_diffusion.py --preset sd15 --lora --resolution 32

`--memory` measures only peak memory, of the low-memory setting a large fine-tune uses: batch 1,
gradient checkpointing, bf16. Ours trains with bf16 weights + float32 masters and each
`train.optimizer` (adamw, adafactor, adamw8bit where bitsandbytes imports), and with adafactor
updating the bf16 weights without masters (train.master_weights=false); diffusers as its
train_text_to_image.py with --gradient_checkpointing --mixed_precision=bf16 (float32 weights,
autocast, torch AdamW). On the CPU each case runs in its own fresh process (peak RSS).

On CPUs without native bf16, bf16 matmuls and convolutions run as float32 kernels on upcast copies
(`_bench_common.Fp32MatmulsForBf16`; the tensors kept stay bf16, so memory is bf16's). The sd15 preset
on the CPU (a full fine-tune step needs about 14 GB) runs each case in its own process, one after the
other, with gradient checkpointing on both sides: one warm-up and one measured step per case (or
`--repeats`), which also give the peak memory; fp32 only where bf16 is emulated; `--memory` measures
each case's first step.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from ldm_cli.backends.cpu import optimize_for_cpu  # noqa: E402
from ldm_cli.config import TrainConfig, from_dict  # noqa: E402
from ldm_cli.diffusion.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from ldm_cli.diffusion.unet import UNet  # noqa: E402
from ldm_cli.diffusion.unet_config import UNetConfig  # noqa: E402
from ldm_cli.training.master_weights import MasterWeights  # noqa: E402
from ldm_cli.training.optim import OPTIMIZERS, build_optimizer  # noqa: E402
from ldm_cli.training.precision import autocast  # noqa: E402


@dataclass
class Preset:
    unet: str  # configs/unet/<name>.yaml
    train: str  # configs/train/<name>.yaml: the memory format `ldm train-diffusion` trains this U-Net in
    latent_size: int
    batch_size: int
    context_length: int
    repeats: int
    description: str


PRESETS = {
    "tiny": Preset("tiny", "diffusion_tiny", 8, 64, 32, 5, "configs/unet/tiny.yaml (~4.6M params), 8x8 latents, batch 64"),
    "small": Preset("small", "diffusion", 32, 16, 32, 3,
                    "configs/unet/small.yaml (~41M params), 32x32 latents (its sample_size), batch 16"),
    "sd15": Preset("sd15", "diffusion", 64, 1, 77, 5, "SD-1.5 U-Net (860M params), 64x64 latents, batch 1 (on the CPU: "
                   "1 measured step per case, each case in its own process, gradient checkpointing)"),
}


@dataclass
class Case:
    side: str  # "ours" | "diffusers"
    precision: str  # fp32 | bf16 (torch.autocast around the forward)
    channels_last: bool = False  # model and inputs in NHWC
    bf16_weights: bool = False  # the model in bf16 with float32 master weights, no autocast (train.bf16_weights)
    fused_adamw: bool = False  # torch.optim.AdamW(fused=True), as `ldm train-diffusion`
    optimizer: str = ""  # ours: a train.optimizer (training/optim.py) instead of fused/default AdamW
    checkpointing: bool = False  # gradient checkpointing (unet.gradient_checkpointing / enable_gradient_checkpointing)
    variant: str = ""  # how the case differs from the side's own training setup, for its name
    lora: bool = False  # only LoRA adapters train (Payload.lora_rank, Payload.lora_targets)
    master_weights: bool = True  # with bf16_weights: float32 masters, or (False) adafactor on the bf16 weights (train.master_weights)

    @property
    def name(self) -> str:
        return " ".join([self.side, self.precision, *([self.variant] if self.variant else [])])


@dataclass
class Payload:
    """Everything a (possibly spawned) process needs to rebuild the cases."""

    unet_config: dict
    latent_size: int
    batch_size: int
    context_length: int
    seed: int
    device: str
    cases: dict[str, Case]
    lora_rank: int = 16
    lora_targets: str = "attention"
    emulate_bf16: bool = False  # bf16 matmuls as float32 kernels (_bench_common.Fp32MatmulsForBf16)
    checkpointing: bool = False  # gradient checkpointing for every case



def build_model(payload: Payload, case: Case) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """The case's model with the shared seed's weights, and a forward(x_t, t, context) -> prediction."""
    from diffusers import UNet2DConditionModel

    config = from_dict(payload.unet_config, UNetConfig)
    config.gradient_checkpointing = case.checkpointing or payload.checkpointing
    torch.manual_seed(payload.seed)
    ours = UNet(config)
    if case.side == "ours":
        if payload.device == "cpu":
            optimize_for_cpu(ours)  # as the trainer does on the CPU
        model, forward = ours, ours
    else:
        model = UNet2DConditionModel(**config.to_diffusers_config())
        model.load_state_dict(ours.state_dict(), strict=True)  # parameter names are diffusers'
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        del ours

        def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return model(x, t, encoder_hidden_states=context, return_dict=False)[0]

    if case.lora:
        add_lora(model, case.side, payload)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    model.to(device=payload.device, memory_format=memory_format).train()
    return model, forward


def add_lora(model: torch.nn.Module, side: str, payload: Payload) -> None:
    """Adapters of the same rank on the same layers: ours as `ldm train-lora`, diffusers' by its `add_adapter`."""
    from ldm_cli.adapters.config import TARGETS, LoraConfig
    from ldm_cli.adapters.inject import inject_lora

    config = LoraConfig(rank=payload.lora_rank, targets=payload.lora_targets)
    if side == "ours":
        inject_lora(model, config)
        return
    from peft import LoraConfig as PeftConfig

    model.requires_grad_(False)
    model.add_adapter(PeftConfig(r=config.rank, lora_alpha=config.effective_alpha, target_modules="|".join(TARGETS[config.targets])))


def build_step(payload: Payload, case: Case, models: dict | None = None) -> Callable[[], torch.Tensor]:
    """One training step of `case` as a closure. `models` shares a model between autocast precisions."""
    device = torch.device(payload.device)
    key = (case.side, case.bf16_weights, case.channels_last, case.fused_adamw, case.optimizer, case.checkpointing,
           case.master_weights, case.lora)
    if models is not None and key in models:
        model, forward, optimizer, master = models[key]
    else:
        model, forward = build_model(payload, case)
        master = MasterWeights(model) if case.bf16_weights and case.master_weights else None  # casts the model to bf16
        if case.bf16_weights and not master:
            model.to(torch.bfloat16)
        # ours as DiffusionTrainer steps (fused AdamW); diffusers as its example training script (default AdamW)
        parameters = master.parameters if master else [p for p in model.parameters() if p.requires_grad]
        if case.optimizer:
            optimizer = build_optimizer(parameters, TrainConfig(optimizer=case.optimizer, lr=1e-4))
        else:
            optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=case.fused_adamw or None)
        if models is not None:
            models[key] = model, forward, optimizer, master
    config = from_dict(payload.unet_config, UNetConfig)
    schedule = NoiseSchedule(ScheduleConfig()).to(device)
    generator = torch.Generator().manual_seed(payload.seed + 1)
    shape = (payload.batch_size, config.in_channels, payload.latent_size, payload.latent_size)
    x0 = torch.randn(shape, generator=generator).to(device)
    context = torch.randn(payload.batch_size, payload.context_length, config.cross_attention_dim, generator=generator).to(device)
    input_dtype = torch.bfloat16 if case.bf16_weights else torch.float32
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    autocast_precision = "fp32" if case.bf16_weights else case.precision

    def plain_step() -> torch.Tensor:
        noise = torch.randn(shape, device=device)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (shape[0],), device=device)
        x_t = schedule.add_noise(x0, noise, timesteps).to(input_dtype).contiguous(memory_format=memory_format)
        with autocast(autocast_precision, device):
            prediction = forward(x_t, timesteps, context.to(input_dtype))
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        if master:
            master.gradients_to_master()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master:
            master.copy_to_model()
        return loss

    def step() -> torch.Tensor:
        with bench.Fp32MatmulsForBf16():
            return plain_step()

    chosen = step if payload.emulate_bf16 and case.precision == "bf16" else plain_step
    chosen.counts = {"parameters": sum(p.numel() for p in model.parameters()),
                     "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return chosen


def build_case(payload: Payload, name: str) -> Callable[[], torch.Tensor]:
    return build_step(payload, payload.cases[name])


def select_cases(args: argparse.Namespace, trainer: TrainConfig) -> list[Case]:
    """ours as `ldm train-diffusion` trains with `trainer` (fused AdamW, its memory format, its bf16_weights at
    bf16); diffusers as its example script (default AdamW, NCHW, autocast); `--variants` flips one of ours'
    settings at a time."""
    chosen = bench.precisions(args.precision)

    def ours(precision: str, **changes) -> Case:
        settings = dict(channels_last=trainer.channels_last, fused_adamw=True,
                        bf16_weights=precision == "bf16" and trainer.bf16_weights)
        return Case("ours", precision, **{**settings, **changes})

    if args.lora:  # as `ldm train-lora`: the frozen base needs no float32 masters
        cases = [case for precision in chosen for case in (
            ours(precision, lora=True, bf16_weights=False), Case("diffusers", precision, lora=True))]
        return cases + [ours(precision, variant="full fine-tune") for precision in chosen]
    cases = [case for precision in chosen for case in (ours(precision), Case("diffusers", precision))]
    if args.variants:
        other_format = "NCHW" if trainer.channels_last else "channels_last"
        cases += [ours(precision, channels_last=not trainer.channels_last, variant=other_format) for precision in chosen]
        cases += [ours(precision, fused_adamw=False, variant="default-AdamW") for precision in chosen]
        if "bf16" in chosen:
            cases.append(ours("bf16", bf16_weights=not trainer.bf16_weights,
                              variant="autocast" if trainer.bf16_weights else "bf16-weights"))
    return cases


def memory_cases(trainer: TrainConfig) -> list[Case]:
    """The low-memory fine-tuning setting: ours per optimiser (bf16 weights + float32 masters), diffusers' AdamW."""
    optimizers = [name for name in OPTIMIZERS if name != "adamw8bit" or importlib.util.find_spec("bitsandbytes")]
    cases = [Case("ours", "bf16", channels_last=trainer.channels_last, bf16_weights=True, optimizer=name,
                  checkpointing=True, variant=name) for name in optimizers]
    cases.append(Case("ours", "bf16", channels_last=trainer.channels_last, bf16_weights=True, optimizer="adafactor",
                      checkpointing=True, master_weights=False, variant="adafactor no-masters"))
    return cases + [Case("diffusers", "bf16", checkpointing=True, variant="AdamW")]


def report_memory(payload: Payload, preset: Preset, args: argparse.Namespace, device: torch.device) -> None:
    print(f"U-Net {preset.unet}, latents {payload.batch_size}x4x{payload.latent_size}x{payload.latent_size}, context "
          f"{payload.context_length}: one training step with gradient checkpointing at bf16\n")
    if "ours bf16 adamw8bit" not in payload.cases:
        print("note: bitsandbytes does not import here; adamw8bit is left out\n")
    if payload.emulate_bf16:
        print("note: this CPU has no native bf16: bf16 matmuls and convolutions run as float32 kernels on upcast "
              "copies (Fp32MatmulsForBf16), every stored tensor stays bf16\n")
    warmup = args.warmup if args.warmup_given or not heavy(args, device) else 0
    if warmup == 0:
        print("note: no warm-up step: the measured step is each case's first (it allocates the optimiser state "
              "while the gradients are held, as every later step holds both)\n")
    print("peak memory (a fresh process per case) ...\n" if device.type == "cpu" else "peak memory ...\n", flush=True)
    memory = bench.measure_memory(list(payload.cases), build_case, payload, warmup, device)
    reference = memory.get("diffusers bf16 AdamW")
    rows = [[name, bench.mib(peak), bench.ratio(peak, reference)] for name, peak in memory.items()]
    bench.print_table(["case", "peak MiB", "vs diffusers"], rows)
    print("\nours: bf16 weights + float32 masters (train.bf16_weights) and the named train.optimizer; 'no-masters': "
          "adafactor updating the bf16 weights with stochastic rounding (train.master_weights=false); diffusers: "
          "train_text_to_image.py's step (float32 weights, autocast, torch AdamW)")
    print(bench.memory_note(device))
    for name in ("ours bf16 adafactor", "ours bf16 adafactor no-masters"):
        if memory.get(name) and reference:
            print(f"{name.removeprefix('ours bf16 ')} vs diffusers: {memory[name] / reference:.2f}x peak memory")


def heavy(args: argparse.Namespace, device: torch.device) -> bool:
    """SD-1.5 size on the CPU: cases measured one at a time, each in its own process, with fewer steps."""
    return args.preset == "sd15" and device.type == "cpu"


def describe(payload: Payload, preset: Preset, args: argparse.Namespace, counts: dict[str, dict[str, int]], repeats: int,
             how: str) -> None:
    """The parameter counts (trainable ones of each LoRA case) and what is measured."""
    for name, case in payload.cases.items():
        if case.lora and name in counts:
            print(f"{name} LoRA: rank {args.lora_rank} on {args.lora_targets}: "
                  f"{counts[name]['trainable'] / 1e6:.2f}M trainable parameters")
    parameters = next(iter(counts.values()))["parameters"]
    print(f"U-Net {preset.unet}: {parameters / 1e6:.1f}M parameters, latents {payload.batch_size}x4x{payload.latent_size}x"
          f"{payload.latent_size}, context {payload.context_length}x{payload.unet_config['cross_attention_dim']}; "
          f"{repeats} measured steps per case after {args.warmup} warm-up, {how}, median\n")


def time_interleaved(payload: Payload, preset: Preset, args: argparse.Namespace, device: torch.device) -> tuple:
    """Every case held at once and timed in interleaved rounds; then peak memory, a fresh process per case."""
    repeats = args.repeats or preset.repeats
    models: dict = {}
    steps = {name: build_step(payload, case, models) for name, case in payload.cases.items()}
    describe(payload, preset, args, {name: step.counts for name, step in steps.items()}, repeats, "interleaved")
    print("timing ...", flush=True)
    flops = bench.count_flops(steps[next(iter(steps))])  # the same for every case: same architecture and batch
    timings = bench.interleaved_timings(steps, repeats, args.warmup, device)
    del steps, models
    memory: dict = {}
    if not args.no_memory:
        print("peak memory (a fresh process per case) ...\n" if device.type == "cpu" else "peak memory ...\n", flush=True)
        memory = bench.measure_memory(list(payload.cases), build_case, payload, args.warmup, device)
    return timings, flops, memory


def time_one_by_one(payload: Payload, preset: Preset, args: argparse.Namespace) -> tuple:
    """Each case in its own fresh process, one after the other: time and peak memory of the same steps."""
    repeats = args.repeats or 1
    print(f"timing and peak memory ({repeats} step(s) after {args.warmup} warm-up, a fresh process per case) ...", flush=True)
    results = bench.isolated_timings(list(payload.cases), build_case, payload, repeats, args.warmup)
    print()
    describe(payload, preset, args, {name: result.counts for name, result in results.items()}, repeats, "one case after another")
    memory = {} if args.no_memory else {name: result.peak for name, result in results.items()}
    return {name: result.timing for name, result in results.items()}, next(iter(results.values())).flops, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    bench.add_common_arguments(parser, {name: preset.description for name, preset in PRESETS.items()}, "tiny",
                               resolution_help="latent side in cells (default: the preset's)")
    parser.add_argument("--context-length", type=int, default=None, help="text tokens per sample (default: the preset's)")
    parser.add_argument("--variants", action="store_true",
                        help="also time ours in the other memory format, with the default AdamW, and at bf16 with "
                             "the other of autocast / bf16 weights + float32 masters (train.bf16_weights)")
    parser.add_argument("--lora", action="store_true", help="time LoRA training steps (only adapters train) against diffusers + peft")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16, the lora config group's)")
    parser.add_argument("--lora-targets", default="attention", help="attention | attention_ff | all")
    parser.add_argument("--memory", action="store_true",
                        help="only peak memory: batch 1, gradient checkpointing, bf16; ours with each train.optimizer "
                             "beside diffusers' train_text_to_image step (AdamW)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's peak TFLOP/s for model-FLOPs utilisation (default 989: H100 SXM dense bf16)")
    args = parser.parse_args()
    args.warmup_given = "--warmup" in sys.argv
    preset = PRESETS[args.preset]
    modes = [flag for flag, on in (("--lora", args.lora), ("--memory", args.memory)) if on]
    device = bench.setup(args, " ".join([f"--preset {args.preset}", *modes]))
    emulate = bench.emulate_bf16(device)
    if heavy(args, device):
        if emulate and args.precision == "both" and not args.memory:
            args.precision = "fp32"
            print("note: fp32 only: this CPU has no native bf16 (compare bf16 with --precision bf16, slowly)")
        if not args.memory:
            print("note: the sd15 preset on the CPU: gradient checkpointing on both sides, each case in its own process "
              "(they do not fit in memory together), one after the other, not interleaved\n")

    trainer = bench.load_yaml("train", preset.train, TrainConfig)
    payload = Payload(
        unet_config=OmegaConf.to_container(OmegaConf.structured(bench.load_yaml("unet", preset.unet, UNetConfig))),
        latent_size=args.resolution or preset.latent_size,
        batch_size=args.batch_size or preset.batch_size,
        context_length=args.context_length or preset.context_length,
        seed=args.seed,
        device=str(device),
        cases={case.name: case for case in select_cases(args, trainer)},
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets,
        emulate_bf16=emulate,
        checkpointing=heavy(args, device),
    )
    if args.memory:
        payload.batch_size = args.batch_size or 1
        payload.cases = {case.name: case for case in memory_cases(trainer)}
        report_memory(payload, preset, args, device)
        return
    if heavy(args, device):
        timings, flops, memory = time_one_by_one(payload, preset, args)
    else:
        timings, flops, memory = time_interleaved(payload, preset, args, device)
    seconds = {name: timing.median for name, timing in timings.items()}

    rows = []
    for name, case in payload.cases.items():
        reference = f"diffusers {case.precision}"
        if case.variant == "full fine-tune":  # the memory a LoRA step saves
            reference = f"ours {case.precision}"
        throughput = payload.batch_size / seconds[name]
        row = [name, f"{seconds[name] * 1e3:.1f}", f"{timings[name].best * 1e3:.1f}", f"{throughput:.1f}",
               bench.ratio(seconds.get(reference), seconds[name]) if case.side == "ours" else "",
               f"{flops / seconds[name] / 1e9:.0f}" if flops else "n/a", bench.mib(memory.get(name)),
               bench.ratio(memory.get(name), memory.get(reference)) if case.side == "ours" and memory else ""]
        if device.type == "cuda":
            row.append(f"{100 * flops / seconds[name] / (args.peak_tflops * 1e12):.1f}%")
        rows.append(row)
    headers = ["case", "ms/step", "min ms", "latents/s", "vs diffusers", "GFLOP/s", "peak MiB", "mem vs diffusers"]
    if device.type == "cuda":
        headers.append(f"MFU@{args.peak_tflops:g}TF")
    bench.print_table(headers, rows)
    print(f"\none step = {(flops or 0) / 1e9:.1f} GFLOP (FlopCounterMode, forward + backward); 'vs diffusers' = ours' "
          "throughput / diffusers' at the same precision (higher is faster); 'mem vs diffusers' = peak / theirs;\n"
          f"ours trains as ldm train-diffusion with train/{preset.train}.yaml (fused AdamW, "
          f"{'channels_last' if trainer.channels_last else 'NCHW'}, bf16 as "
          f"{'bf16 weights + float32 masters' if trainer.bf16_weights else 'autocast'}), diffusers as its "
          "train_text_to_image.py (default AdamW, NCHW, autocast)")
    if memory:
        print(bench.memory_note(device))

    print("\nsummary (throughput ratios, higher is faster):")
    for precision in bench.precisions(args.precision):
        speedup = seconds[f"diffusers {precision}"] / seconds[f"ours {precision}"]
        print(f"  ours vs diffusers at {precision}: {speedup:.2f}x")
    if args.lora and memory:
        for precision in bench.precisions(args.precision):
            full, lora = memory.get(f"ours {precision} full fine-tune"), memory.get(f"ours {precision}")
            if full and lora:
                print(f"  LoRA step peak memory / full fine-tune at {precision}: {lora / full:.2f}")
    if args.precision == "both":
        print(f"  ours bf16 vs ours fp32: {seconds['ours fp32'] / seconds['ours bf16']:.2f}x")
    if device.type == "cpu":
        print("note: on a shared CPU these timings are noisy; rerun with more --repeats before drawing conclusions")


if __name__ == "__main__":
    main()
