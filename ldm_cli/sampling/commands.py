"""`ldm sample` and `ldm img2img`: check every input, load the model, generate, write PNGs.

Everything a user can get wrong is checked before --out is created, so a failed command writes
nothing. Files are `{index:05d}-{seed}.png`, the index continuing after the highest one already in
--out, and a name is claimed with O_EXCL: nothing is ever overwritten, even by two runs at once.
Image i of a run uses seed S + i, so `--seed S+i -n 1` remakes it alone, and `--replay` remakes an
image from its own metadata (recomputing its batch when it was made in one, for identical pixels).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from ldm_cli import __version__
from ldm_cli.adapters.merge import Applied
from ldm_cli.adapters.prompts import lora_metadata, lora_specs, read_loras, replay_loras
from ldm_cli.bundle import file_sha256
from ldm_cli.config import SampleConfig
from ldm_cli.data.images import tensor_to_pil
from ldm_cli.diffusion.load import LatentDiffusion, load_latent_diffusion
from ldm_cli.errors import DataError, LdmError, UsageError
from ldm_cli.grid import make_grid
from ldm_cli.sampling.init_images import InitImage, inspect_init_image, list_init_images
from ldm_cli.sampling.metadata import png_info, read_metadata
from ldm_cli.sampling.pipeline import ImageJob, InitLatent, SamplingPipeline, check_image_size, weight_dtypes
from ldm_cli.sampling.settings import SamplingLimits, SamplingSettings
from ldm_cli.training.precision import resolve_device, resolve_precision

MAX_SEED = 2**63 - 1
INDEXED_NAME = re.compile(r"^(\d{5,})-.*\.(png|json)$")


@dataclass
class SampleRequest:
    """The command-line options of `ldm sample` / `ldm img2img`."""

    out: Path
    model: Optional[Path] = None
    prompts: list[str] = field(default_factory=list)  # each --prompt; "" is an unconditional sample
    prompt_file: Optional[Path] = None  # one prompt per line, added after --prompt's
    negative_prompt: str = ""
    num_images: int = 1  # per prompt (and per init image)
    batch_size: int = 1
    steps: int = SamplingSettings.steps
    guidance_scale: float = SamplingSettings.guidance_scale
    sampler: str = SamplingSettings.sampler
    seed: int = 0  # negative: a random seed (printed, and stored in each image)
    height: Optional[int] = None  # default: the model's resolution (img2img: from the init image)
    width: Optional[int] = None
    eta: Optional[float] = None
    precision: str = "auto"
    device: str = "auto"
    grid: bool = False
    json_sidecar: bool = False
    init: Optional[Path] = None  # img2img: an image or a folder of images
    strength: float = 0.75  # img2img only
    loras: list[str] = field(default_factory=list)  # each --lora FILE[:SCALE]
    prompt_weighting: bool = True
    clip_skip: int = 1


@dataclass
class Written:
    images: list[Path]
    grid: Optional[Path] = None

    def summary(self) -> str:
        if not self.images:
            return "no images written"
        names = self.images[0].name if len(self.images) == 1 else f"{self.images[0].name} … {self.images[-1].name}"
        text = f"wrote {len(self.images)} image(s) to {self.images[0].parent}: {names}"
        return text + (f"\ngrid: {self.grid}" if self.grid else "")


# ------------------------------------------------------------------------------------ prompts, seeds


def read_prompts(prompts: list[str], prompt_file: Optional[Path]) -> list[str]:
    """--prompt values, then the non-blank lines of --prompt-file; at least one prompt in all."""
    prompts = list(prompts)
    if prompt_file is not None:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read --prompt-file {prompt_file} ({error})") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"--prompt-file {prompt_file} holds no prompts (one per line)")
        prompts += from_file
    if not prompts:
        raise UsageError('give --prompt TEXT (--prompt "" for unconditional samples) or --prompt-file FILE')
    return prompts


def resolve_seed(seed: int, count: int) -> int:
    if seed < 0:
        seed = secrets.randbelow(2**32)
        print(f"seed: {seed}")
    if seed + count > MAX_SEED:
        raise UsageError(f"--seed {seed} is too large; seeds S … S+{count - 1} must stay below 2^63")
    return seed


def _settings(request: SampleRequest, config: SampleConfig, strength: float) -> SamplingSettings:
    return SamplingSettings(
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        sampler=request.sampler,
        eta=request.eta,
        negative_prompt=request.negative_prompt,
        strength=strength,
        timestep_spacing=config.timestep_spacing,
        karras_sigmas=config.karras_sigmas,
        prompt_weighting=request.prompt_weighting,
        clip_skip=request.clip_skip,
    )


def limits_of(config: SampleConfig) -> SamplingLimits:
    return SamplingLimits(max_steps=config.max_steps, max_side=config.max_side, max_batch_size=config.max_batch_size)


def _check_counts(request: SampleRequest, config: SampleConfig) -> None:
    if request.num_images < 1:
        raise UsageError(f"--num-images must be a positive integer, got {request.num_images}")
    if not 1 <= request.batch_size <= config.max_batch_size:
        raise UsageError(
            f"--batch-size must be between 1 and {config.max_batch_size} (raise it with max_batch_size=N), got {request.batch_size}"
        )
    _check_out(request.out)


def _check_out(out: Path) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")


def _load_model(
    path: Optional[Path], device: torch.device, precision: str, loras: Applied = (), inpainting_ok: bool = False
) -> LatentDiffusion:
    """The model with its weights read straight into the dtypes sampling at `precision` computes in."""
    if path is None:
        raise UsageError("--model is required (a latent-diffusion run directory or bundle)")
    unet_dtype, autoencoder_dtype = weight_dtypes(precision)
    model = load_latent_diffusion(path, device, unet_dtype, loras, autoencoder_dtype)
    if model.is_inpainting and not inpainting_ok:
        raise UsageError(
            f"{path} is an inpainting model (its U-Net reads a mask and a masked image); use `ldm inpaint --init IMAGE --mask MASK`"
        )
    return model


def _loras(request: SampleRequest, prompts: list[str]) -> tuple[list[str], Applied]:
    """Prompts without their `<lora:…>` tags, and every LoRA file of the run, read."""
    prompts, specs = lora_specs(request.loras, prompts)
    return prompts, read_loras(specs)


def _lora_metadata(applied: Applied) -> dict[str, Any]:
    return {"loras": lora_metadata(list(applied))} if applied else {}


def _pipeline(model: LatentDiffusion, device: torch.device, precision: str, config: SampleConfig) -> SamplingPipeline:
    return SamplingPipeline(model, device, precision, config.tile_decode_above, config.tile_latent_size, compile=config.compile)


def _base_metadata(mode: str, settings: SamplingSettings, pipeline: SamplingPipeline) -> dict[str, Any]:
    bundle = pipeline.model.bundle
    return {
        "mode": mode,
        **{key: value for key, value in settings.to_metadata().items() if key not in ("height", "width", "strength")},
        "precision": pipeline.precision,
        "compiled": pipeline.compiled,  # compiled kernels round differently: a replay compiles too
        "model": str(bundle.path.resolve()),
        "model_hash": bundle.content_hash,
        "ldm_version": __version__,
        "device": pipeline.device.type,  # identical pixels are promised on the same kind of device
    }


# -------------------------------------------------------------------------------------------- output


class OutputFolder:
    """Claims `{index:05d}-{seed}.png` names after the highest index already in the folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.index: Optional[int] = None

    def _next_index(self) -> int:
        highest = -1
        if self.path.is_dir():
            for entry in self.path.iterdir():
                match = INDEXED_NAME.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest + 1

    def _claim_grid(self, stem: str) -> Path:
        """`stem.png`, or `stem-1.png`, ... when taken: a grid never replaces an existing file."""
        for number in itertools.count():
            path = self.path / (f"{stem}.png" if number == 0 else f"{stem}-{number}.png")
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:
                continue
        raise AssertionError("unreachable")

    def _claim(self, name_of_index) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.index is None:
            self.index = self._next_index()
        while True:
            path = self.path / name_of_index(self.index)
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return path
            except FileExistsError:  # another run took it meanwhile
                self.index += 1

    def write_image(self, image: Image.Image, seed: int, meta: dict[str, Any], json_sidecar: bool) -> Path:
        path = self._claim(lambda index: f"{index:05d}-{seed}.png")
        self.index += 1  # type: ignore[operator]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(meta))
        write_atomic(path, buffer.getvalue())
        if json_sidecar:
            write_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        return path

    def write_grid(self, images: list[torch.Tensor], columns: int, first: Path, last: Path) -> Path:
        """A contact sheet of [3, H, W] images in [-1, 1]; smaller ones are padded with white."""
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
        padded = torch.ones(len(images), 3, height, width)
        for i, image in enumerate(images):
            padded[i, :, : image.shape[-2], : image.shape[-1]] = image
        path = self._claim_grid(f"grid-{first.name.split('-')[0]}-{last.name.split('-')[0]}")
        buffer = io.BytesIO()
        make_grid(padded, columns).save(buffer, format="PNG")
        write_atomic(path, buffer.getvalue())
        return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename: a full disk leaves no half-written or 0-byte image."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # the name claimed for it
        raise LdmError(f"could not write {path} ({error.strerror or error}); nothing was left in its place") from error


def _grid_columns(count: int, per_row: int) -> int:
    return per_row if 1 < per_row < count else max(1, math.ceil(math.sqrt(count)))


def _batch_metadata(batch: list[ImageJob]) -> dict[str, Any]:
    # a deterministic batch's pixels depend (by float rounding) on its batch-mates: name them for --replay
    if len(batch) == 1:
        return {}
    return {"batch": {"seeds": [job.seed for job in batch], "prompts": [job.prompt for job in batch]}}


def _write_batches(
    pipeline: SamplingPipeline, jobs: list[ImageJob], settings: SamplingSettings, batch_size: int,
    folder: OutputFolder, base_meta: dict[str, Any], json_sidecar: bool, written: list[Path],
    keep: Optional[list[torch.Tensor]],
) -> None:
    for batch, images in pipeline.generate(jobs, settings, batch_size):
        for job, image in zip(batch, images):
            meta = {**base_meta, "prompt": job.prompt, "seed": job.seed, **_batch_metadata(batch)}
            written.append(folder.write_image(tensor_to_pil(image), job.seed, meta, json_sidecar))
            if keep is not None:
                keep.append(image)


# ------------------------------------------------------------------------------------------ commands


def run_sample(request: SampleRequest, config: SampleConfig) -> Written:
    """`ldm sample`: text → images."""
    prompts = read_prompts(request.prompts, request.prompt_file)
    _check_counts(request, config)
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    settings = _settings(request, config, strength=1.0)
    limits = limits_of(config)
    settings.height, settings.width = request.height or settings.height, request.width or settings.width
    settings.validate(limits=limits)  # the model's own step limit is checked once it is loaded
    prompts, loras = _loras(request, prompts)
    model = _load_model(request.model, device, precision, loras)
    settings.height = request.height or model.resolution
    settings.width = request.width or model.resolution
    settings.validate(model.schedule.num_train_timesteps, limits)
    check_image_size(settings.height, settings.width, model)
    seed = resolve_seed(request.seed, len(prompts) * request.num_images)

    pipeline = _pipeline(model, device, precision, config)
    base = {**_base_metadata("txt2img", settings, pipeline), "height": settings.height, "width": settings.width,
            **_lora_metadata(loras)}
    jobs = [ImageJob(prompt, seed + i) for i, prompt in enumerate(p for p in prompts for _ in range(request.num_images))]
    folder, written = OutputFolder(request.out), []
    kept: Optional[list[torch.Tensor]] = [] if request.grid else None
    _write_batches(pipeline, jobs, settings, request.batch_size, folder, base, request.json_sidecar, written, kept)
    grid = folder.write_grid(kept, _grid_columns(len(kept), request.num_images), written[0], written[-1]) if kept else None
    return Written(written, grid)


def run_img2img(request: SampleRequest, config: SampleConfig) -> Written:
    """`ldm img2img`: init image(s) + text → images (SDEdit, Meng et al. 2022)."""
    prompts = read_prompts(request.prompts, request.prompt_file)
    _check_counts(request, config)
    if request.init is None:
        raise UsageError("--init is required (an image or a folder of images)")
    device = resolve_device(request.device)
    precision = resolve_precision(request.precision, device)
    settings = _settings(request, config, strength=request.strength)
    limits = limits_of(config)
    settings.height, settings.width = request.height or settings.height, request.width or settings.width
    settings.validate(limits=limits)
    init_paths = list_init_images(request.init)
    prompts, loras = _loras(request, prompts)
    model = _load_model(request.model, device, precision, loras)
    settings.validate(model.schedule.num_train_timesteps, limits)
    inits = [inspect_init_image(path, model, request.height, request.width) for path in init_paths]
    per_init = len(prompts) * request.num_images
    seed = resolve_seed(request.seed, len(inits) * per_init)

    pipeline = _pipeline(model, device, precision, config)
    base = {**_base_metadata("img2img", settings, pipeline), **_lora_metadata(loras)}
    folder, written = OutputFolder(request.out), []
    kept: Optional[list[torch.Tensor]] = [] if request.grid else None
    for number, init in enumerate(inits):
        if init.note():
            print(init.note())
        latent = InitLatent(pipeline.encode_image(init.pixels()), key=init.sha256)
        first_seed = seed + number * per_init
        jobs = [ImageJob(prompt, first_seed + i, latent)
                for i, prompt in enumerate(p for p in prompts for _ in range(request.num_images))]
        meta = {**base, **_init_metadata(init, settings)}
        _write_batches(pipeline, jobs, settings, request.batch_size, folder, meta, request.json_sidecar, written, kept)
    grid = folder.write_grid(kept, _grid_columns(len(kept), per_init), written[0], written[-1]) if kept else None
    return Written(written, grid)


def _init_metadata(init: InitImage, settings: SamplingSettings) -> dict[str, Any]:
    return {
        "strength": settings.strength,
        "init_image": str(init.path),
        "init_sha256": init.sha256,
        "init_resized_to": list(init.resized_to) if init.resized_to else None,
        "width": init.size[0],
        "height": init.size[1],
    }


def settings_from_metadata(meta: dict[str, Any], image: Path, limits: SamplingLimits) -> SamplingSettings:
    """The sampling settings an image's metadata records, type-checked and validated."""
    settings = SamplingSettings.from_metadata(meta, str(image))
    settings.validate(limits=limits)
    return settings


def check_replay_model(
    loaded: LatentDiffusion, model: Path, meta: dict[str, Any], image: Path, device: torch.device,
    settings: SamplingSettings, limits: SamplingLimits,
) -> None:
    """Step limits and sizes (errors), and notes when model, device or version differ from the image's."""
    settings.validate(loaded.schedule.num_train_timesteps, limits)
    check_image_size(settings.height, settings.width, loaded)
    if loaded.bundle.content_hash != meta.get("model_hash"):
        print(f"note: {model} is not the model {Path(image).name} was made with (content hash differs); pixels will differ")
    if meta.get("device") not in (None, device.type):
        print(f"note: {Path(image).name} was made on {meta['device']}, this replay runs on {device.type}; pixels may differ slightly")
    if meta.get("ldm_version") not in (None, __version__):
        # another version may run other kernels (layouts, fused ops), which round differently
        print(f"note: {Path(image).name} was made with ldm {meta['ldm_version']}, this is ldm {__version__}; pixels may differ slightly")


def replay_identity(loaded: LatentDiffusion, device: torch.device) -> dict[str, Any]:
    """What a replayed image records about where it was remade."""
    return {"model": str(loaded.bundle.path.resolve()), "model_hash": loaded.bundle.content_hash,
            "ldm_version": __version__, "device": device.type}


def run_replay(
    image: Path, out: Path, config: SampleConfig, model: Optional[Path] = None, device_name: str = "auto",
    init: Optional[Path] = None, json_sidecar: bool = False,
) -> Written:
    """`ldm sample --replay IMAGE.png`: the same pixels again, from the image's own metadata."""
    meta = read_metadata(image)
    if model is None:
        model = Path(meta["model"])
        if not model.exists():
            raise UsageError(f"the model recorded in {image} ({model}) is not here; pass --model")
    _check_out(out)
    if meta["mode"] == "inpaint":
        from ldm_cli.sampling.inpaint import replay_inpaint

        request = SampleRequest(out=out, model=model, device=device_name, json_sidecar=json_sidecar)
        return replay_inpaint(meta, image, request, config, init, None)
    device = resolve_device(device_name)
    precision = resolve_precision(meta["precision"], device)
    img2img = meta["mode"] == "img2img"
    limits = limits_of(config)
    settings = settings_from_metadata(meta, image, limits)
    batch = meta.get("batch") or {"seeds": [meta["seed"]], "prompts": [meta["prompt"]]}
    _check_replay_batch(batch, meta, image, limits)
    init_path = Path(init or meta.get("init_image") or "") if img2img else None
    if init_path is not None and not init_path.is_file():
        raise DataError(f"the init image of {image} is no longer at {init_path}; put it back there to replay")
    if init_path is not None and file_sha256(init_path) != meta["init_sha256"]:
        raise DataError(f"{init_path} is not the init image {image} was made from (its sha256 differs)")
    loaded = _load_model(model, device, precision, replay_loras(meta.get("loras") or [], Path(image)))
    check_replay_model(loaded, model, meta, image, device, settings, limits)

    pipeline = _pipeline(loaded, device, precision, replace(config, compile=bool(meta.get("compiled", False))))
    latent = None
    if init_path is not None:
        resized_to = tuple(meta["init_resized_to"]) if meta.get("init_resized_to") else None
        plan = inspect_init_image(init_path, loaded, settings.height, settings.width, resized_to, replay=True)  # type: ignore[arg-type]
        latent = InitLatent(pipeline.encode_image(plan.pixels()), key=plan.sha256)
    jobs = [ImageJob(prompt, int(seed), latent) for prompt, seed in zip(batch["prompts"], batch["seeds"])]
    position = [job.seed for job in jobs].index(int(meta["seed"]))
    _, images = next(iter(pipeline.generate(jobs, settings, batch_size=len(jobs))))
    replayed = {**meta, **replay_identity(loaded, device)}
    path = OutputFolder(out).write_image(tensor_to_pil(images[position]), int(meta["seed"]), replayed, json_sidecar)
    return Written([path])


def _check_replay_batch(batch: Any, meta: dict[str, Any], image: Path, limits: SamplingLimits) -> None:
    """A replayed image's batch comes from an untrusted file: the right types, a bounded size, its own seed in it."""
    seeds, prompts = (batch.get("seeds"), batch.get("prompts")) if isinstance(batch, dict) else (None, None)
    if (
        not isinstance(seeds, list) or not isinstance(prompts, list) or len(seeds) != len(prompts)
        or not all(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED for seed in seeds)
        or not all(isinstance(prompt, str) for prompt in prompts) or meta["seed"] not in seeds
    ):
        raise DataError(f"the batch recorded in {image} is malformed (seeds, prompts); it cannot be replayed")
    if len(seeds) > limits.max_batch_size:
        raise UsageError(
            f"{image} was made in a batch of {len(seeds)}, over the limit of {limits.max_batch_size} (raise it with max_batch_size=N)"
        )
