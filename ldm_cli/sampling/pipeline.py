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
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ldm_cli.autoencoder.model import tiled_decode
from ldm_cli.diffusion.load import LatentDiffusion
from ldm_cli.diffusion.transformer import TextKeysValues
from ldm_cli.diffusion.unet import TimeProjections
from ldm_cli.errors import ConfigError, UsageError
from ldm_cli.sampling.compile import compile_for_inference
from ldm_cli.sampling.denoiser import Denoiser, get_sigmas
from ldm_cli.sampling.prepack import is_prepacked, prepack_for_cpu
from ldm_cli.sampling.samplers import SAMPLERS, sample
from ldm_cli.training.precision import DTYPES, autocast

DEFAULT_SAMPLER = "dpmpp_2m"


# ---------------------------------------------------------------------------------------- settings


@dataclass
class SamplingSettings:
    """How to sample; the same for every image of a run (sizes of img2img images come from their init)."""

    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = DEFAULT_SAMPLER
    eta: Optional[float] = None  # None: the sampler's own default; only samplers with an `eta` take it
    negative_prompt: str = ""
    height: int = 512
    width: int = 512
    strength: float = 1.0  # img2img: the fraction of the σ schedule re-noised; 1 starts from pure noise
    timestep_spacing: str = "trailing"  # leading | trailing | linspace | exponential (log σ evenly spaced)
    karras_sigmas: bool = False
    prompt_weighting: bool = True  # A1111's (word:1.2) syntax and BREAK; False reads prompts literally
    clip_skip: int = 1  # use the N-th CLIP hidden state from the end (1: the last)

    @property
    def spacing(self) -> str:
        return "karras" if self.karras_sigmas else self.timestep_spacing

    def sampler_options(self) -> dict[str, float]:
        return {} if self.eta is None else {"eta": self.eta}

    def effective_eta(self) -> Optional[float]:
        """The eta the sampler runs with (its default when none was given); None if it takes none."""
        parameter = inspect.signature(SAMPLERS[self.sampler]).parameters.get("eta")
        if parameter is None:
            return None
        return float(self.eta if self.eta is not None else parameter.default)

    def start_index(self) -> int:
        """SDEdit's first step k = S − int(S · strength): strength 1 → 0 (all steps), 0 → S (none)."""
        return self.steps - int(self.steps * self.strength)

    def validate(self, num_train_timesteps: Optional[int] = None) -> None:
        """Raise UsageError / ConfigError on a value no run could use (before anything is written);
        the steps are checked against `num_train_timesteps` once the model is known."""
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.eta is not None:
            if self.effective_eta() is None:
                takers = [name for name, fn in SAMPLERS.items() if "eta" in inspect.signature(fn).parameters]
                raise ConfigError(f"sampler {self.sampler!r} takes no --eta; samplers with eta: {', '.join(takers)}")
            if self.eta < 0:
                raise UsageError(f"--eta must be >= 0, got {self.eta}")
        if self.steps < 1:
            raise UsageError(f"--steps must be a positive integer, got {self.steps}")
        if num_train_timesteps is not None and not self.karras_sigmas and self.steps > num_train_timesteps:
            raise UsageError(f"--steps {self.steps} exceeds the model's {num_train_timesteps} training timesteps")
        if not 0.0 <= self.strength <= 1.0:
            raise UsageError(f"--strength must be between 0 and 1, got {self.strength}")
        if self.clip_skip < 1:
            raise UsageError(f"--clip-skip must be a positive integer, got {self.clip_skip}")
        if self.timestep_spacing not in ("leading", "trailing", "linspace", "exponential"):
            raise ConfigError(
                f"timestep_spacing must be leading, trailing, linspace or exponential, got {self.timestep_spacing!r}"
            )


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


def initial_noise(seed: int, shape: Sequence[int], generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The start noise ε of the image with this seed: float32, drawn on the CPU, so the same on every device.
    Pass `generator` (seeded with `seed`) to keep drawing from the same stream afterwards."""
    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


# ---------------------------------------------------------------------------------------- pipeline


class SamplingPipeline:
    """A loaded latent-diffusion model ready to sample: `pipeline(jobs, settings) -> images`.

    It takes the model over: the U-Net is cast to the compute dtype in place and, on the CPU, its weights
    are packed for oneDNN (`prepack.py`), which leaves it inference-only (load the model anew to train
    or save it)."""

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
        # The U-Net holds its weights in the compute dtype (autocast would re-cast frozen weights every
        # call); the text encoder runs once per prompt and stays float32. The autoencoder stays float32
        # too and decodes under bf16 autocast only: SD's VAE can overflow in fp16.
        self.unet_dtype = DTYPES[precision]
        if channels_last is None:
            # Tensor-core convolutions want NHWC, and so do oneDNN's packed CPU convolutions, which answer
            # in NHWC: no layout copy around each one. Measured for the `small` U-Net on the CPU (eager):
            # 16x16 latents fp32 3-15% faster, bf16 even (aten's bf16 GroupNorm is slower in NHWC);
            # 32x32: 10% / 6%; 64x64 bf16: 16%. compile=true on the CPU picks its own layouts.
            channels_last = self.device.type == "cuda" or not compile
        self.channels_last = channels_last
        if is_prepacked(model.unet):  # an earlier pipeline made this U-Net inference-only, as it then was
            # (packed convolutions take either layout, so only the dtype, device and compile mode must match)
            same = next(model.unet.parameters()).dtype == self.unet_dtype and self.device.type == "cpu"
            if not same or compile:
                raise ValueError("this U-Net was packed for CPU inference by another pipeline; load the model again")
        else:
            model.unet.to(device=self.device, dtype=self.unet_dtype)
            if self.channels_last:
                model.unet.to(memory_format=torch.channels_last)
        self.compiled = compile  # torch.compile the U-Net: a slow first step, faster ones after
        self._unet_forward = compile_for_inference(model.unet) if compile else model.unet
        if prepack is None:  # eager on the CPU: weights packed once for oneDNN (compile=true packs them itself)
            prepack = self.device.type == "cpu" and not compile
        if prepack:
            prepack_for_cpu(model.unet)
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

    def _vae_autocast(self) -> contextlib.AbstractContextManager:
        return autocast("bf16" if self.precision == "bf16" else "fp32", self.device)

    def _unet(
        self, x: torch.Tensor, t: torch.Tensor, text: TextKeysValues, time: Optional[TimeProjections] = None
    ) -> torch.Tensor:
        """The U-Net at timesteps `t`, or at the step whose projections `time` holds (from `_project_time`)."""
        x = x.to(self.unet_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            output = self._unet_forward(x, t if time is None else time, text)
        return output.float()  # the sampler's state stays float32

    def _project_text(self, context: torch.Tensor) -> TextKeysValues:
        """The cross-attention keys and values of `context`, once for all the steps of a sampling run."""
        with self._autocast():
            return self.model.unet.project_text(context.to(self.unet_dtype))

    def _project_time(self, sigmas: torch.Tensor) -> dict[float, TimeProjections]:
        """The U-Net's time projections at each σ > 0 of a run, all computed in one go, by σ (the python
        floats samplers pass). Not with compile=true: the compiled graph computes them itself, and two
        kinds of call would compile twice."""
        sigmas = sigmas[sigmas > 0]
        if self.compiled or not len(sigmas):
            return {}
        with self._autocast():
            steps = self.model.unet.project_time(self.denoiser.sigma_to_t(sigmas.to(self.device)), self.unet_dtype)
        return {
            sigma: TimeProjections(tuple(layer[i : i + 1] for layer in steps.layers))
            for i, sigma in enumerate(sigmas.tolist())
        }

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
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
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
        self, context: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, sigmas: Optional[torch.Tensor] = None,
        extra_channels: Optional[torch.Tensor] = None,
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """D(x; σ) with classifier-free guidance (Ho & Salimans 2022): D_u + w (D_c − D_u).

        Guiding the x_0 estimate equals guiding ε (or v): D is affine in the network output with the
        same coefficients in both branches. `sigmas`: the run's σ's, whose time projections are then
        computed up front (any other σ still works). `extra_channels` [B, c, h, w]: appended to the U-Net's
        input after c_in scaling (an inpainting U-Net's mask and masked-image latent).
        """
        times = self._project_time(sigmas) if sigmas is not None else {}
        denoiser = self.denoiser
        if extra_channels is not None:
            denoiser = Denoiser(
                lambda x, t, **cond: self._unet(torch.cat([x, extra_channels.to(x.dtype)], dim=1), t, **cond),
                self.model.schedule,
            )
        if guidance_scale == 1.0:
            text = self._project_text(context)
            return lambda x, sigma: denoiser(x, sigma, text=text, time=times.get(sigma))
        both_text = self._project_text(torch.cat([uncond.expand_as(context), context]))

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            # x once, both texts: the U-Net runs its layers before the first cross-attention once for both
            uncond_x0, cond_x0 = denoiser(x, sigma, text=both_text, time=times.get(sigma)).chunk(2)
            return uncond_x0 + guidance_scale * (cond_x0 - uncond_x0)

        return denoise

    # 4. decode -----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents → images [B, 3, H, W] in [-1, 1], float32 on the CPU."""
        autoencoder = self.model.autoencoder
        z = autoencoder.from_diffusion_space(latents.float())
        with self._vae_autocast():
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
        with torch.inference_mode(), self._vae_autocast():
            posterior = autoencoder.model.encode(image[None].to(self.device))
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

