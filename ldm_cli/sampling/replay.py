"""`ldm sample --replay IMAGE.png`: remake an image from its own metadata, with identical pixels.

An image made in a batch is remade by recomputing that whole batch (its pixels depend, by float
rounding, on its batch-mates); the recorded batch, model, init image and LoRAs are checked first,
since the metadata comes from a file anyone could have edited.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from ldm_cli import __version__
from ldm_cli.adapters.prompts import replay_loras
from ldm_cli.bundle import file_sha256
from ldm_cli.config import SampleConfig
from ldm_cli.data.images import tensor_to_pil
from ldm_cli.diffusion.load import LatentDiffusion
from ldm_cli.errors import DataError, UsageError
from ldm_cli.sampling.commands import MAX_SEED, SampleRequest, check_out, limits_of, load_model, make_pipeline
from ldm_cli.sampling.init_images import inspect_init_image
from ldm_cli.sampling.metadata import read_metadata
from ldm_cli.sampling.output import OutputFolder, Written
from ldm_cli.sampling.pipeline import ImageJob, InitLatent, check_image_size
from ldm_cli.sampling.settings import SamplingLimits, SamplingSettings
from ldm_cli.training.precision import resolve_device, resolve_precision


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
    check_out(out)
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
    loaded = load_model(model, device, precision, replay_loras(meta.get("loras") or [], Path(image)))
    check_replay_model(loaded, model, meta, image, device, settings, limits)

    pipeline = make_pipeline(loaded, device, precision, replace(config, compile=bool(meta.get("compiled", False))))
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
