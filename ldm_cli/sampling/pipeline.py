"""Text → image and image → image with a latent-diffusion bundle, in numbered steps (as diffusers):

1. encode prompts   once per distinct prompt, each alone (so an embedding never depends on its
                    batch-mates), with A1111's weights and 75-token chunks (`TextEncoder.encode_prompt`);
                    the negative prompt ("" by default) is the unconditional branch, and the shorter
                    side is padded with empty-prompt chunks; a batch only holds prompts of one length
2. prepare latents  image i draws its noise from its own CPU generator seeded with its seed, in
                    float32, then moves it to the device: an image does not depend on the batch it
                    was made in, nor on the device's random number generator. txt2img starts at
                    x = σ_0 ε; img2img (SDEdit) at x = x_0 + σ_k ε and walks σ_k … 0
3. denoise          a sampler over the σ's; classifier-free guidance in ONE batched forward of
                    x with the [uncond, cond] texts, whose layers before the first cross-attention
                    run once for both (skipped at guidance_scale 1)
4. decode           latents → pixels with the autoencoder, in tiles above `tile_decode_above`
5. to PIL           by the caller (commands.py), from the float images returned here

Samplers that add fresh noise (ancestral, SDE, DDPM, DDIM with eta > 0) get one generator per
image, the one its start noise came from, so image i's noise never depends on its batch. Batched
images equal the batch-size-1 images up to float rounding (kernels sum in a batch-dependent order),
which is why the metadata of a batched image names its batch and a replay recomputes that batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ldm_cli.autoencoder.model import tiled_decode
from ldm_cli.backends.cpu import (
    optimize_autoencoder_for_cpu, optimize_for_cpu, optimize_for_cpu_inference, packable, prepack_available, trim_heap,
)
from ldm_cli.backends.guided import GuidedUNet
from ldm_cli.diffusion.load import LatentDiffusion, WeightDtypes
from ldm_cli.errors import UsageError
from ldm_cli.noise import generators_for, initial_noise
from ldm_cli.sampling.compile import compile_for_inference
from ldm_cli.sampling.denoiser import Denoiser, get_sigmas
from ldm_cli.sampling.guidance import guide
from ldm_cli.sampling.samplers import sample
from ldm_cli.sampling.settings import DEFAULT_SAMPLER, SamplingLimits, SamplingSettings
from ldm_cli.training.precision import DTYPES, autocast

__all__ = ["DEFAULT_SAMPLER", "ImageJob", "InitLatent", "SamplingLimits", "SamplingPipeline", "SamplingSettings",
           "check_image_size", "initial_noise", "plan_batches", "weight_dtypes"]


def weight_dtypes(precision: str) -> WeightDtypes:
    """The weight dtypes sampling at `precision` loads. Weights live in the compute dtype (autocast would
    re-cast frozen weights at every call and keep a float32 copy). The autoencoder and the text encoder
    are bf16 at bf16 and float32 otherwise: SD's VAE overflows in fp16. Load the model in these
    (`load_latent_diffusion`) and nothing is held in float32 at bf16."""
    others = torch.bfloat16 if precision == "bf16" else torch.float32
    return WeightDtypes(DTYPES[precision], others, others)


def check_image_size(height: int, width: int, model: LatentDiffusion, what: str = "--height/--width") -> None:
    """Sides must be multiples of the autoencoder's factor, and big enough for every U-Net level."""
    factor = model.downsampling_factor
    smallest = factor * model.unet.downsample_factor
    for name, side in (("height", height), ("width", width)):
        if side % factor:
            lower, upper = side // factor * factor, (side // factor + 1) * factor
            raise UsageError(
                f"{what}: {name} {side} is not a multiple of {factor} (the autoencoder's downsampling factor); "
                f"use {lower or upper} or {upper}"
            )
        if side < smallest:
            raise UsageError(f"{what}: {name} {side} is too small; this model needs at least {smallest} (a multiple of {factor})")


# -------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True, eq=False)
class InitLatent:
    """An img2img start: the init image's latent in diffusion space, [C, h, w], on the sampling device."""

    latent: torch.Tensor
    key: str  # names the init image (its sha256): batches never mix two inits


@dataclass(frozen=True)
class ImageJob:
    """One image to make."""

    prompt: str
    seed: int
    init: Optional[InitLatent] = None


def plan_batches(
    jobs: Sequence[ImageJob], batch_size: int, group: Optional[Callable[[ImageJob], object]] = None
) -> list[list[ImageJob]]:
    """Consecutive jobs with the same init (hence size) and `group` value, at most `batch_size` each."""
    size = max(1, batch_size)
    batches: list[list[ImageJob]] = []

    def key(job: ImageJob) -> object:
        return (_init_key(job), group(job) if group is not None else None)

    for job in jobs:
        if batches and len(batches[-1]) < size and key(batches[-1][0]) == key(job):
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def _init_key(job: ImageJob) -> Optional[str]:
    return job.init.key if job.init is not None else None


# ---------------------------------------------------------------------------------------- pipeline


class SamplingPipeline:
    """A loaded latent-diffusion model ready to sample: `pipeline(jobs, settings) -> images`.

    It takes the model over: the U-Net is cast to the compute dtype in place, gets the sampling-run
    caches (`backends/guided.py`) and, on the CPU, packed oneDNN weights (`backends/cpu.py`), which
    leave it inference-only (load the model anew to train or save it)."""

    def __init__(
        self,
        model: LatentDiffusion,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        tile_decode_above: int = 1024,
        tile_latent_size: int = 64,
        channels_last: Optional[bool] = None,
        compile: bool = False,
        prepack: Optional[bool] = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.tile_decode_above = tile_decode_above
        self.tile_latent_size = tile_latent_size
        self.unet_dtype, self.autoencoder_dtype, _ = weight_dtypes(precision)
        model.autoencoder.model.to(device=self.device, dtype=self.autoencoder_dtype)
        if channels_last is None:
            # Tensor-core convolutions want NHWC, and so do oneDNN's packed CPU convolutions, which answer
            # in NHWC: no layout copy around each one. compile=true on the CPU picks its own layouts.
            channels_last = self.device.type == "cuda" or not compile
        self.channels_last = channels_last
        if self.device.type == "cpu" and channels_last:
            optimize_autoencoder_for_cpu(model.autoencoder.model)
        unet = model.unet
        self.compiled = compile  # torch.compile the U-Net: a slow first step, faster ones after
        self.guided: Optional[GuidedUNet] = getattr(unet, "guided", None)
        if self.guided is not None:  # another pipeline prepared this U-Net for sampling, as it then was
            same = next(unet.parameters()).dtype == self.unet_dtype and next(unet.parameters()).device.type == self.device.type
            if not same or compile:
                raise ValueError("this U-Net was prepared for sampling by another pipeline; load the model again")
        else:
            unet.to(device=self.device, dtype=self.unet_dtype)
            if prepack is None:  # eager on the CPU: weights packed once for oneDNN (compile=true packs them itself)
                prepack = self.device.type == "cpu" and not compile
            packs = prepack and prepack_available() and packable(next(unet.parameters()))
            if self.channels_last and not packs:  # packing reads either layout: no copy for it to replace
                unet.to(memory_format=torch.channels_last)
            if self.device.type == "cpu":
                optimize_for_cpu(unet)
            if compile:  # the compiled graph computes the text and time projections itself, and fuses the rest
                self._compiled_unet = compile_for_inference(unet)
            else:
                self.guided = unet.guided = GuidedUNet(unet)
            if prepack:
                optimize_for_cpu_inference(unet)
        self.denoiser = Denoiser(self._unet, model.schedule)
        self._embeddings: dict[tuple[str, bool, int], torch.Tensor] = {}

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    @property
    def factor(self) -> int:
        return self.model.downsampling_factor

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, key: float, text: torch.Tensor) -> torch.Tensor:
        """The U-Net on x [B, ...] at timesteps t for each of the run's texts [n·B, L, D]: [n·B, ...] float32."""
        x = x.to(self.unet_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if self.guided is not None:
                output = self.guided(x, t, key)
            else:
                copies = text.shape[0] // x.shape[0]
                output = self._compiled_unet(torch.cat([x] * copies), torch.cat([t] * copies), text.to(self.unet_dtype))
        return output.float()  # the sampler's state stays float32

    def begin_run(self, text: torch.Tensor, sigmas: torch.Tensor) -> None:
        """Project the run's text [n·B, L, D] and the time embedding at each σ > 0 of `sigmas` once, for all
        its steps (keyed by the python floats samplers pass)."""
        if self.guided is None:
            return
        sigmas = sigmas[sigmas > 0]
        with self._autocast():
            self.guided.begin_run(
                text.to(self.unet_dtype), self.denoiser.sigma_to_t(sigmas.to(self.device)), sigmas.tolist(), self.unet_dtype
            )

    # 1. encode prompts --------------------------------------------------------------------------

    def encode_prompt(self, prompt: str, weighting: bool = True, clip_skip: int = 1) -> torch.Tensor:
        """One prompt's embedding [chunks · L, D] (float32; see `TextEncoder.encode_prompt`), computed once."""
        key = (prompt, weighting, clip_skip)
        if key not in self._embeddings:
            self._embeddings[key] = self.model.text_encoder.encode_prompt(prompt, weighting, clip_skip).float()
        return self._embeddings[key]

    def encode_prompts(self, prompts: Sequence[str], weighting: bool = True, clip_skip: int = 1) -> torch.Tensor:
        """Text embeddings [len(prompts), n · L, D] (float32): prompts of fewer chunks than the longest are
        padded with chunks of the empty prompt (as A1111 pads a short negative prompt)."""
        embeddings = [self.encode_prompt(prompt, weighting, clip_skip) for prompt in prompts]
        longest = max(len(embedding) for embedding in embeddings)
        empty = self.encode_prompt("", weighting, clip_skip)
        padded = []
        for embedding in embeddings:
            missing = (longest - len(embedding)) // len(empty)
            padded.append(torch.cat([embedding, *[empty] * missing]) if missing else embedding)
        return torch.stack(padded)

    # 2. prepare latents --------------------------------------------------------------------------

    def latent_shape(self, job: ImageJob, settings: SamplingSettings) -> tuple[int, int, int]:
        if job.init is not None:
            return tuple(job.init.latent.shape)  # type: ignore[return-value]
        return (self.latent_channels, settings.height // self.factor, settings.width // self.factor)

    def prepare_latents(
        self, jobs: Sequence[ImageJob], settings: SamplingSettings, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """x = σ_0 ε (txt2img, and img2img at strength 1) or x_0 + σ_k ε (img2img), with ε drawn from each
        job's own generator; the generators are returned so that sampler noise continues their streams."""
        generators = generators_for([job.seed for job in jobs])
        noise = torch.stack([
            initial_noise(job.seed, self.latent_shape(job, settings), generator) for job, generator in zip(jobs, generators)
        ]).to(self.device)
        start = settings.start_index()
        if jobs[0].init is None or start == 0:
            return noise * sigmas[0].item(), generators
        x0 = torch.stack([job.init.latent for job in jobs]).float()
        return x0 + noise * sigmas[start].item(), generators

    def sigmas(self, settings: SamplingSettings) -> torch.Tensor:
        return get_sigmas(self.model.schedule, settings.steps, settings.spacing)

    # 3. denoise ----------------------------------------------------------------------------------

    def guided_denoiser(
        self, context: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, sigmas: torch.Tensor,
        extra_channels: Optional[torch.Tensor] = None,
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """D(x; σ) with classifier-free guidance (`guidance.guide`) for a run over `sigmas`: one batched
        forward of x with the [uncond, cond] texts (the text alone at guidance_scale 1). `extra_channels`
        [B, c, h, w] are appended to the U-Net's input after c_in scaling (an inpainting U-Net's mask and
        masked-image latent)."""
        text = context if guidance_scale == 1.0 else torch.cat([uncond.expand_as(context), context])
        self.begin_run(text, sigmas)
        denoiser = self.denoiser
        if extra_channels is not None:
            denoiser = Denoiser(
                lambda x, t, **cond: self._unet(torch.cat([x, extra_channels.to(x.dtype)], dim=1), t, **cond),
                self.model.schedule,
            )

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            x0 = denoiser(x, sigma, key=sigma, text=text)
            return x0 if guidance_scale == 1.0 else guide(*x0.chunk(2), guidance_scale)

        return denoise

    # 4. decode -----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents → images [B, 3, H, W] in [-1, 1], float32 on the CPU."""
        autoencoder = self.model.autoencoder
        z = autoencoder.from_diffusion_space(latents.float()).to(self.autoencoder_dtype)
        if self.device.type == "cpu":
            trim_heap()  # the steps' freed activations leave resident memory before the decoder's peak
        if max(z.shape[-2:]) * self.factor > self.tile_decode_above:
            pixels = tiled_decode(autoencoder.model, z, tile_latent=self.tile_latent_size, overlap=self.tile_latent_size // 4)
        else:
            pixels = autoencoder.model.decode(z)
        return pixels.float().clamp(-1, 1).cpu()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """An init image [3, H, W] in [-1, 1] → its latent [C, h, w] in diffusion space.

        The posterior's mode, not a sample: img2img then needs no randomness beyond its seed's noise
        (a trained KL-f8 posterior is so narrow that the two differ by far less than σ_k ε).
        """
        autoencoder = self.model.autoencoder
        with torch.inference_mode():
            posterior = autoencoder.model.encode(image[None].to(self.device, self.autoencoder_dtype))
        return autoencoder.to_diffusion_space(posterior.mode().float())[0]

    # all steps -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self, jobs: Sequence[ImageJob], settings: SamplingSettings, callback: Optional[Callable[[int, int], None]] = None
    ) -> torch.Tensor:
        """Make one batch (same size, same init): images [B, 3, H, W] float32 in [-1, 1] on the CPU."""
        texts = self.encode_prompts(
            [*(job.prompt for job in jobs), settings.negative_prompt], settings.prompt_weighting, settings.clip_skip
        ).to(self.device)
        context, uncond = texts[:-1], texts[-1:]
        sigmas = self.sigmas(settings)
        x, generators = self.prepare_latents(jobs, settings, sigmas)
        walk = sigmas[settings.start_index():]
        denoise = self.guided_denoiser(context, uncond, settings.guidance_scale, walk)
        x = sample(settings.sampler, denoise, x, walk, generator=generators, callback=callback, **settings.sampler_options())
        return self.decode(x)

    def generate(
        self, jobs: Sequence[ImageJob], settings: SamplingSettings, batch_size: int = 1, progress: bool = True
    ) -> Iterator[tuple[list[ImageJob], torch.Tensor]]:
        """Run `jobs` in batches (see `plan_batches`), yielding (batch jobs, images) as each finishes."""
        # images with prompts of other chunk counts are not batched together: padding would change them
        batches = plan_batches(
            jobs, batch_size, lambda job: len(self.encode_prompt(job.prompt, settings.prompt_weighting, settings.clip_skip))
        )
        steps_per_run = len(self.sigmas(settings)) - 1 - settings.start_index()
        bar = tqdm(total=len(batches) * steps_per_run, unit="step", desc="sampling", disable=None if progress else True)
        done = 0
        try:
            for batch in batches:
                bar.set_postfix_str(f"images {done}/{len(jobs)}")
                images = self(batch, settings, callback=lambda step, total: bar.update(1))
                done += len(batch)
                bar.set_postfix_str(f"images {done}/{len(jobs)}")
                yield batch, images
        finally:
            bar.close()

