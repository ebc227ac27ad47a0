"""Whole-process sampling runs: what a user waits for, from `python` starting to the PNG on disk.

Each case runs in a fresh interpreter (`python scripts/_bench_process.py CASE.json`), so imports, weight
loading and packing count as they do for a user; its weight files start in the page cache, as on a
second run. The child records when each phase ends (clock started as its first statement) and its own
peak RSS, and saves its image as float pixels; the parent adds the interpreter's start-up by timing the
whole subprocess.

Phases: import (torch, transformers, the pipeline's modules); load (weights read and the model built,
to the first moment the pipeline could run); text (the prompt and the negative prompt encoded);
first step (the first denoising step, including one-time set-up such as weight packing); steps (the
median of the later steps); decode (latents to pixels); save (the PNG written).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before any heavy import: the child's clock

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # torch is imported inside the child's phases, where its import time is measured
    import torch

PHASES = ("import", "load", "text", "first step", "decode", "save")


@dataclass
class ProcessCase:
    """One whole-process run: which implementation, at what precision and size, txt2img or img2img."""

    side: str  # "ours" | "diffusers"
    precision: str  # "fp32" | "bf16"
    model: str  # ours: bundle directory; diffusers: save_pretrained folder
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    out: str  # folder for the PNG and the float pixels
    threads: int | None = None
    init_image: str | None = None  # img2img from this PNG
    strength: float = 0.6
    sigma_max: float = 0.0  # ours' σ_0 for the schedule: diffusers starts at the same ε scaled to its VP state
    prompt: str = "a photograph of an astronaut riding a horse"

    @property
    def name(self) -> str:
        mode = "img2img" if self.init_image else "txt2img"
        return f"{self.side} {self.precision} {mode} {self.width}x{self.height}"


@dataclass
class ProcessResult:
    case: ProcessCase
    wall: float  # the whole subprocess, interpreter start to exit
    marks: dict[str, float] = field(default_factory=dict)  # phase -> seconds since the child's clock started
    step_ends: list[float] = field(default_factory=list)  # each denoising step's end, same clock
    peak_rss: int = 0  # bytes
    error: str = ""

    @property
    def phases(self) -> dict[str, float]:
        """Seconds spent in each phase (first step = the first step's time; `steps` = median later step)."""
        marks, ends = self.marks, self.step_ends
        text_end = marks["text"]
        durations = {"import": marks["import"], "load": marks["load"] - marks["import"], "text": text_end - marks["load"],
                     "first step": ends[0] - text_end, "decode": marks["decode"] - ends[-1], "save": marks["save"] - marks["decode"]}
        later = [b - a for a, b in zip(ends, ends[1:])]
        durations["steps"] = statistics.median(later) if later else durations["first step"]
        return durations

    @property
    def first_step_setup(self) -> float:
        """The first step's extra time over a later one: one-time set-up (packing, allocator warm-up)."""
        phases = self.phases
        return max(0.0, phases["first step"] - phases["steps"])

    def fixed(self) -> float:
        """Everything but the denoising steps' own time: start-up, load, text, set-up, decode, save."""
        return self.wall - len(self.step_ends) * self.phases["steps"]

    def at_steps(self, steps: int) -> float:
        """Whole-process seconds at `steps` denoising steps: the fixed part plus that many median steps."""
        return self.fixed() + steps * self.phases["steps"]


# ------------------------------------------------------------------------------------------- child


def peak_rss() -> int:
    """This process's resident-memory high-water mark in bytes. VmHWM, not getrusage's ru_maxrss, which
    survives exec and so would report the benchmark parent's peak at the time it forked."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def _ours(case: ProcessCase, mark) -> "torch.Tensor":
    import torch

    from ldm_cli.diffusion.load import load_latent_diffusion
    from ldm_cli.sampling.pipeline import ImageJob, InitLatent, SamplingPipeline, SamplingSettings, weight_dtypes
    mark("import")
    model = load_latent_diffusion(case.model, "cpu", weight_dtypes(case.precision))
    pipeline = SamplingPipeline(model, "cpu", case.precision)
    mark("load")
    settings = SamplingSettings(steps=case.steps, guidance_scale=case.guidance_scale, sampler="ddim", timestep_spacing="leading",
                                height=case.height, width=case.width, strength=case.strength if case.init_image else 1.0)
    init = None
    if case.init_image:
        import numpy as np
        from PIL import Image

        pixels = torch.from_numpy(np.asarray(Image.open(case.init_image).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
        init = InitLatent(pipeline.encode_image(pixels / 127.5 - 1), "init")
    pipeline.encode_prompts([case.prompt, settings.negative_prompt])  # the call below finds them computed
    mark("text")  # img2img: the init image's encoding included (diffusers' pipeline encodes it in its first step)
    images = pipeline([ImageJob(case.prompt, case.seed, init)], settings, callback=lambda step, total: mark("step"))
    mark("decode")
    save_png(images, Path(case.out) / "image.png")
    mark("save")
    return images


def save_png(images, path: Path) -> None:
    from PIL import Image

    from ldm_cli.grid import to_uint8

    Image.fromarray(to_uint8(images)[0].numpy()).save(path)


def _diffusers(case: ProcessCase, mark) -> "torch.Tensor":
    import torch

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    mark("import")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.precision]
    kind = StableDiffusionImg2ImgPipeline if case.init_image else StableDiffusionPipeline
    pipeline = kind.from_pretrained(case.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    mark("load")
    with torch.inference_mode():
        cond, uncond = pipeline.encode_prompt(case.prompt, "cpu", 1, True, "")
    mark("text")

    def on_step(pipe, step, timestep, kwargs):
        mark("step")
        return kwargs

    options = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=case.steps,
                   guidance_scale=case.guidance_scale, callback_on_step_end=on_step, output_type="pt")
    if case.init_image:
        from PIL import Image

        options.update(image=Image.open(case.init_image).convert("RGB"), strength=case.strength,
                       generator=torch.Generator().manual_seed(case.seed))
    else:
        from ldm_cli.noise import initial_noise

        scale = case.sigma_max / math.sqrt(case.sigma_max**2 + 1)  # diffusers' DDIM starts at the VP state of the same ε
        factor = pipeline.vae_scale_factor
        noise = initial_noise(case.seed, (pipeline.unet.config.in_channels, case.height // factor, case.width // factor))[None]
        options.update(latents=(noise * scale).to(dtype), height=case.height, width=case.width)
    with torch.inference_mode():
        images = pipeline(**options).images.float() * 2 - 1
    mark("decode")
    save_png(images, Path(case.out) / "image.png")
    mark("save")
    return images


def run_child(case_file: Path) -> None:
    case = ProcessCase(**json.loads(case_file.read_text()))
    marks: dict[str, float] = {}
    step_ends: list[float] = []

    def mark(phase: str) -> None:
        now = time.perf_counter() - STARTED
        if phase == "step":
            step_ends.append(now)
        else:
            marks[phase] = now

    import torch

    if case.threads:
        torch.set_num_threads(case.threads)
    images = (_ours if case.side == "ours" else _diffusers)(case, mark)
    torch.save(images.float().cpu(), Path(case.out) / "pixels.pt")
    peak = peak_rss()
    (Path(case.out) / "result.json").write_text(json.dumps({"marks": marks, "step_ends": step_ends, "peak_rss": peak}))


# ------------------------------------------------------------------------------------------ parent


def read_through(folder: Path) -> None:
    """Read every file under `folder` once, so that its pages are in the page cache."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def run_case(case: ProcessCase) -> ProcessResult:
    """Run `case` in a fresh interpreter; its wall time includes the interpreter's own start-up. Each side's
    weights are read into the page cache just before (as on a second run): hosts that page out cold memory
    (e.g. DAMON reclaim on VMs) otherwise make the load time a disk read of whatever the last case evicted."""
    out = Path(case.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "case.json").write_text(json.dumps(asdict(case)))
    read_through(Path(case.model))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, str(out / "case.json")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return ProcessResult(case, wall, error=(done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
    measured = json.loads((out / "result.json").read_text())
    return ProcessResult(case, wall, measured["marks"], measured["step_ends"], measured["peak_rss"])


def pixels(result: ProcessResult):
    import torch

    return torch.load(Path(result.case.out) / "pixels.pt", weights_only=True)


if __name__ == "__main__":
    run_child(Path(sys.argv[1]))
