"""The sampling pipeline: against diffusers' Stable Diffusion pipelines, and per-image reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel

from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.errors import ConfigError, UsageError
from ldm_cli.sampling import pipeline as pipeline_module
from ldm_cli.sampling.init_images import plan_init_size
from ldm_cli.sampling.denoiser import Denoiser, get_timesteps
from ldm_cli.sampling.guidance import guide
from ldm_cli.sampling.pipeline import (
    ImageJob,
    InitLatent,
    SamplingPipeline,
    SamplingSettings,
    check_image_size,
    initial_noise,
    plan_batches,
    weight_dtypes,
)
from ldm_cli.sampling.samplers import sample
from tests.sampling.helpers import write_tiny_latent_diffusion

SIZE = dict(height=16, width=16)
SD_DDIM = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True, clip_sample=False,
    steps_offset=1, timestep_spacing="leading",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_latent_diffusion(write_tiny_latent_diffusion(tmp_path_factory.mktemp("sampling") / "model"))


@pytest.fixture(scope="module")
def pipe(model) -> SamplingPipeline:
    return SamplingPipeline(model, "cpu", "fp32")


def as_numpy(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW → [0, 1] NHWC, as diffusers' output_type='np'."""
    return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def diffusers_parts(model) -> dict:
    """The same weights in diffusers' classes (our parameter names are diffusers')."""
    autoencoder = model.autoencoder.model.config
    levels = len(autoencoder.block_out_channels)
    vae = DiffusersAutoencoderKL(
        in_channels=autoencoder.in_channels, out_channels=autoencoder.out_channels,
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(autoencoder.block_out_channels), layers_per_block=autoencoder.layers_per_block,
        latent_channels=autoencoder.latent_channels, norm_num_groups=autoencoder.norm_num_groups,
        scaling_factor=model.autoencoder.latent_scale,
    )
    vae.load_state_dict(model.autoencoder.model.state_dict())
    unet = UNet2DConditionModel(**model.unet.config.to_diffusers_config())
    # from the bundle: a sampling pipeline on the CPU keeps `model.unet`'s weights packed for oneDNN
    unet.load_state_dict(load_latent_diffusion(model.bundle.path).unet.state_dict())
    return dict(
        vae=vae.eval(), unet=unet.eval(), text_encoder=model.text_encoder.model, tokenizer=model.text_encoder.tokenizer,
        scheduler=DDIMScheduler(**SD_DDIM), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---- the reference: diffusers' StableDiffusionPipeline with the same weights ----


@pytest.mark.parametrize(("guidance_scale", "negative_prompt"), [(7.5, "a blue square"), (1.0, "")])
def test_txt2img_matches_diffusers_stable_diffusion_pipeline(model, pipe, guidance_scale, negative_prompt):
    prompts, seeds = ["a red circle", "a green triangle"], [3, 4]
    settings = SamplingSettings(
        steps=10, guidance_scale=guidance_scale, sampler="ddim", negative_prompt=negative_prompt,
        timestep_spacing="leading", **SIZE,
    )
    ours = pipe([ImageJob(prompt, seed) for prompt, seed in zip(prompts, seeds)], settings)

    reference = StableDiffusionPipeline(**diffusers_parts(model))
    reference.set_progress_bar_config(disable=True)
    # Our samplers start at x = σ_0 ε (x = x_0 + σ ε); diffusers' DDIM at the VP state x_T = x / sqrt(σ_0² + 1)
    # (its init_noise_sigma is 1), so the same ε enters diffusers scaled by σ_0 / sqrt(σ_0² + 1).
    sigma_max = pipe.sigmas(settings)[0].item()
    noise = torch.stack([initial_noise(seed, (4, 8, 8)) for seed in seeds])
    expected = reference(
        prompts, negative_prompt=[negative_prompt] * 2 if guidance_scale > 1 else None, num_inference_steps=10,
        guidance_scale=guidance_scale, latents=noise * sigma_max / math.sqrt(sigma_max**2 + 1), output_type="np", **SIZE,
    ).images
    assert 0.05 < expected.std() and 0.1 < expected.mean() < 0.9  # a real picture, not saturated
    np.testing.assert_allclose(as_numpy(ours), expected, atol=1e-3, rtol=0)


def test_img2img_matches_diffusers_img2img_pipeline(model, pipe):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent = pipe.encode_image(image)
    settings = SamplingSettings(steps=10, guidance_scale=5.0, sampler="ddim", strength=0.5, timestep_spacing="leading")
    ours = pipe([ImageJob("a red circle", 11, InitLatent(latent, "init"))], settings)

    reference = StableDiffusionImg2ImgPipeline(**diffusers_parts(model))
    reference.set_progress_bar_config(disable=True)
    # diffusers takes 4-channel input as ready latents (it would otherwise sample the posterior; we use its mode)
    # and adds noise from the generator: the same draw as our seed's noise
    expected = reference(
        "a red circle", image=latent[None], strength=0.5, num_inference_steps=10, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(11), output_type="np",
    ).images
    np.testing.assert_allclose(as_numpy(ours), expected, atol=1e-3, rtol=0)


# ---- per-image reproducibility ----


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_image_alone_is_identical_to_the_same_seed_inside_a_run(pipe, sampler):
    settings = SamplingSettings(steps=6, sampler=sampler, **SIZE)
    jobs = [ImageJob("a red circle", 10), ImageJob("a blue square", 11), ImageJob("a red circle", 12)]
    run = torch.cat([images for _, images in pipe.generate(jobs, settings, batch_size=1, progress=False)])
    alone = pipe([ImageJob("a red circle", 12)], settings)
    assert np.array_equal(to_uint8(run[2:]), to_uint8(alone))
    assert not np.array_equal(to_uint8(run[0:1]), to_uint8(run[2:]))  # seeds matter


def test_stochastic_sampler_batches_with_each_image_on_its_own_noise(pipe):
    settings = SamplingSettings(steps=6, sampler="euler_ancestral", **SIZE)
    jobs = [ImageJob("a red circle", seed) for seed in (20, 21, 22)]
    (batch, batched), = list(pipe.generate(jobs, settings, batch_size=3, progress=False))
    assert len(batch) == 3
    alone = pipe([ImageJob("a red circle", 21)], settings)
    # the middle image equals itself made alone up to float rounding; with another noise stream it would not
    torch.testing.assert_close(batched[1:2], alone, atol=1e-4, rtol=0)
    assert not np.array_equal(to_uint8(batched[0:1]), to_uint8(batched[1:2]))


def test_batched_deterministic_images_match_single_images_up_to_rounding(pipe):
    settings = SamplingSettings(steps=6, sampler="dpmpp_2m", **SIZE)
    jobs = [ImageJob("a red circle", seed) for seed in (30, 31, 32, 33)]
    (batch, batched), = list(pipe.generate(jobs, settings, batch_size=4, progress=False))
    assert len(batch) == 4
    for position in (0, 2, 3):
        alone = pipe([jobs[position]], settings)
        torch.testing.assert_close(batched[position : position + 1], alone, atol=1e-4, rtol=0)
    # the same batch again is bit-identical (what --replay of a batched image relies on)
    assert torch.equal(pipe(jobs, settings), batched)


def test_noise_is_a_cpu_float32_draw_of_the_seed(pipe):
    settings = SamplingSettings(steps=4, **SIZE)
    x, generators = pipe.prepare_latents([ImageJob("", 5), ImageJob("", 6)], settings, pipe.sigmas(settings))
    sigma_max = pipe.sigmas(settings)[0].item()
    assert torch.equal(x[1], initial_noise(6, (4, 8, 8)) * sigma_max)
    assert all(generator.device.type == "cpu" for generator in generators)


# ---- guidance, prompts, img2img, decode ----


@pytest.fixture
def forward_batch_sizes(pipe):
    """(latent rows, text rows, output rows) of every U-Net call."""
    sizes: list[tuple[int, int, int]] = []
    hook = pipe.model.unet.register_forward_hook(
        lambda module, args, output: sizes.append((args[0].shape[0], args[2].shape[0], output.shape[0]))
    )
    yield sizes
    hook.remove()


def test_guidance_is_one_batched_forward_and_scale_one_skips_the_unconditional_branch(pipe, forward_batch_sizes):
    sizes = forward_batch_sizes
    jobs = [ImageJob("a", 1), ImageJob("b", 2), ImageJob("c", 3)]
    pipe(jobs, SamplingSettings(steps=4, guidance_scale=3.0, sampler="euler", **SIZE))
    assert sizes == [(3, 6, 6)] * 4  # each latent once, with its [uncond, cond] texts: both outputs
    sizes.clear()
    pipe(jobs, SamplingSettings(steps=4, guidance_scale=1.0, sampler="euler", **SIZE))
    assert sizes == [(3, 3, 3)] * 4


def test_guidance_extrapolates_from_the_negative_prompt(pipe):
    settings = dict(steps=4, sampler="euler", **SIZE)
    job = [ImageJob("a red circle", 1)]
    conditional = pipe(job, SamplingSettings(guidance_scale=1.0, **settings))
    same_negative = pipe(job, SamplingSettings(guidance_scale=4.0, negative_prompt="a red circle", **settings))
    other_negative = pipe(job, SamplingSettings(guidance_scale=4.0, negative_prompt="a blue square", **settings))
    torch.testing.assert_close(same_negative, conditional, atol=1e-5, rtol=0)  # D_u = D_c: guidance is a no-op
    assert (other_negative - conditional).abs().max() > 1e-2


def test_each_distinct_prompt_is_encoded_once(model, monkeypatch):
    pipe = SamplingPipeline(model, "cpu", "fp32")
    encoded: list[str] = []
    encode = model.text_encoder.encode_prompt
    monkeypatch.setattr(model.text_encoder, "encode_prompt", lambda prompt, *options: encoded.append(prompt) or encode(prompt, *options))
    jobs = [ImageJob("a", 1), ImageJob("b", 2), ImageJob("a", 3)]
    for _ in pipe.generate(jobs, SamplingSettings(steps=2, **SIZE), batch_size=2, progress=False):
        pass
    assert encoded == ["a", "b", ""]  # each alone, so an embedding never depends on its batch


def test_img2img_strength_zero_is_the_reconstruction_and_one_ignores_the_init(pipe):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    init = InitLatent(pipe.encode_image(image), "init")
    untouched = pipe([ImageJob("a red circle", 3, init)], SamplingSettings(steps=5, strength=0.0))
    reconstruction = pipe.decode(init.latent[None])
    assert torch.equal(untouched, reconstruction)
    from_noise = pipe([ImageJob("a red circle", 3, init)], SamplingSettings(steps=5, strength=1.0))
    txt2img = pipe([ImageJob("a red circle", 3)], SamplingSettings(steps=5, **SIZE))
    assert torch.equal(from_noise, txt2img)


def test_img2img_walks_the_last_steps_of_the_schedule(pipe, monkeypatch):
    seen: list[float] = []
    model_fn = pipe.denoiser.model_fn
    monkeypatch.setattr(pipe.denoiser, "model_fn", lambda x, t, **cond: seen.append(float(t.reshape(-1)[0])) or model_fn(x, t, **cond))
    init = InitLatent(pipe.encode_image(torch.zeros(3, 16, 16)), "zeros")
    settings = SamplingSettings(steps=10, strength=0.55, sampler="euler", timestep_spacing="trailing")
    pipe([ImageJob("x", 0, init)], settings)
    assert settings.start_index() == 5  # 10 − int(5.5)
    assert seen == get_timesteps(pipe.model.schedule, 10, "trailing")[5:].float().tolist()


def _plain_guided_denoiser(model, context, uncond, scale):
    """Guidance the plain way: the bundle's U-Net, untouched by any backend, on [x, x] with [uncond, cond]."""
    unet = load_latent_diffusion(model.bundle.path).unet.eval()
    text = torch.cat([uncond.expand_as(context), context])
    denoiser = Denoiser(lambda x, t: unet(torch.cat([x, x]), torch.cat([t, t]), text), model.schedule)
    return lambda x, sigma: guide(*denoiser(x, sigma).chunk(2), scale)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m_sde"])  # two σ per step; fresh noise
def test_pipeline_images_equal_the_plain_models(model, pipe, sampler):
    settings = SamplingSettings(steps=4, sampler=sampler, guidance_scale=3.0, **SIZE)
    jobs = [ImageJob("a red circle", 7), ImageJob("a blue square", 8)]
    context, uncond = pipe.encode_prompts([job.prompt for job in jobs]), pipe.encode_prompts([""])
    sigmas = pipe.sigmas(settings)
    x, generators = pipe.prepare_latents(jobs, settings, sigmas)
    with torch.inference_mode():
        plain = sample(sampler, _plain_guided_denoiser(model, context, uncond, 3.0), x, sigmas, generator=generators)
    torch.testing.assert_close(pipe(jobs, settings), pipe.decode(plain), atol=1e-4, rtol=0)


def test_a_sigma_off_the_runs_grid_still_denoises(model, pipe):
    context, uncond = pipe.encode_prompts(["a", "b"]), pipe.encode_prompts([""])
    x = torch.randn(2, pipe.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = _plain_guided_denoiser(model, context, uncond, 3.0)
    with torch.inference_mode():
        with_grid = pipe.guided_denoiser(context, uncond, 3.0, torch.tensor([10.0, 2.0, 0.0]))
        for sigma in (2.0, 5.0):  # on the grid, off it
            torch.testing.assert_close(with_grid(x, sigma), plain(x, sigma), atol=1e-4, rtol=0)  # packed kernels round apart


def test_large_images_are_decoded_in_tiles(model, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline_module, "tiled_decode", lambda vae, z, tile_latent, overlap: calls.append((z.shape, tile_latent)) or vae.decode(z))
    pipe = SamplingPipeline(model, "cpu", "fp32", tile_decode_above=16, tile_latent_size=4)
    pipe([ImageJob("x", 0)], SamplingSettings(steps=1, height=16, width=16))
    assert calls == []
    images = pipe([ImageJob("x", 0)], SamplingSettings(steps=1, height=16, width=24))
    assert calls == [((1, 4, 8, 12), 4)] and images.shape == (1, 3, 16, 24)


def test_bf16_precision_samples_close_to_fp32(model, pipe):
    jobs, settings = [ImageJob("a red circle", 4)], SamplingSettings(steps=4, sampler="euler", **SIZE)
    reference = pipe(jobs, settings)
    # loaded as `ldm sample --precision bf16` loads it: no part's weights in float32
    loaded = load_latent_diffusion(model.bundle.path, "cpu", weight_dtypes("bf16"))
    parts = {"unet": loaded.unet, "autoencoder": loaded.autoencoder.model, "text encoder": loaded.text_encoder}
    assert {name: {p.dtype for p in part.parameters()} for name, part in parts.items()} == {
        name: {torch.bfloat16} for name in parts
    }
    low = SamplingPipeline(loaded, "cpu", "bf16")
    torch.testing.assert_close(low.encode_prompt("a red circle"), pipe.encode_prompt("a red circle"), atol=0.05, rtol=0.02)
    images = low(jobs, settings)
    assert images.dtype == torch.float32 and (images - reference).abs().mean() < 0.05


def test_channels_last_gives_the_same_images(model):
    jobs, settings = [ImageJob("a red circle", 4), ImageJob("", 5)], SamplingSettings(steps=4, sampler="euler", **SIZE)
    nchw = SamplingPipeline(load_latent_diffusion(model.bundle.path), "cpu", "fp32", channels_last=False)
    nhwc = SamplingPipeline(load_latent_diffusion(model.bundle.path), "cpu", "fp32", prepack=False)
    assert nhwc.channels_last and nhwc.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    reference = nchw(jobs, settings)
    torch.testing.assert_close(nhwc(jobs, settings), reference, atol=1e-4, rtol=0)
    # the default in eager mode: channels_last inputs, weights packed from their stored layout
    packed = SamplingPipeline(load_latent_diffusion(model.bundle.path), "cpu", "fp32")
    assert packed.channels_last
    torch.testing.assert_close(packed(jobs, settings), reference, atol=1e-4, rtol=0)
    # compile=true on the CPU leaves the layout to the compiler
    assert not SamplingPipeline(load_latent_diffusion(model.bundle.path), "cpu", "fp32", compile=True).channels_last


# ---- batches, settings and sizes ----


def test_plan_batches_never_mixes_init_images():
    a, b = InitLatent(torch.zeros(1), "a"), InitLatent(torch.zeros(1), "b")
    jobs = [ImageJob("p", 0, a), ImageJob("p", 1, a), ImageJob("p", 2, a), ImageJob("p", 3, b), ImageJob("p", 4, b)]
    assert [[job.seed for job in batch] for batch in plan_batches(jobs, 2)] == [[0, 1], [2], [3, 4]]
    assert [len(batch) for batch in plan_batches([ImageJob("p", i) for i in range(5)], 4)] == [4, 1]


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(sampler="plms"), ConfigError, "dpmpp_2m, dpmpp_2m_sde"),
        (dict(sampler="euler", eta=0.5), ConfigError, "euler_ancestral"),
        (dict(steps=0), UsageError, "--steps must be a positive"),
        (dict(steps=2000), UsageError, "1000 training timesteps"),
        (dict(strength=1.5), UsageError, "--strength must be between 0 and 1"),
        (dict(strength=-0.1), UsageError, "--strength"),
        (dict(eta=-1.0, sampler="ddim"), UsageError, "--eta"),
    ],
)
def test_settings_refuse_bad_values(settings, error, message):
    with pytest.raises(error, match=message):
        SamplingSettings(**settings).validate(1000)
    if "training timesteps" not in message:  # the rest need no model
        with pytest.raises(error, match=message):
            SamplingSettings(**settings).validate()


def test_effective_eta_is_the_samplers_own_default():
    assert SamplingSettings(sampler="ddim").effective_eta() == 0.0 and SamplingSettings(sampler="euler").effective_eta() is None
    assert SamplingSettings(sampler="euler_ancestral").effective_eta() == 1.0
    assert SamplingSettings(sampler="euler_ancestral", eta=0.3).effective_eta() == 0.3


def test_image_size_must_be_a_multiple_of_the_downsampling_factor(model):
    check_image_size(16, 24, model)
    with pytest.raises(UsageError, match="height 15 is not a multiple of 2.*use 14 or 16"):
        check_image_size(15, 16, model)
    with pytest.raises(UsageError, match="width 2 is too small; this model needs at least 4"):
        check_image_size(16, 2, model)


@pytest.mark.parametrize(
    ("size", "height", "width", "expected"),
    [
        ((20, 18), None, None, (None, (20, 18))),  # kept
        ((21, 17), None, None, (None, (20, 16))),  # cropped to multiples of 2
        ((100, 50), None, None, ((32, 16), (32, 16))),  # > 2 × resolution: shorter side → 16
        ((200, 20), None, None, ((32, 3), (32, 2))),  # a panorama: longer side at most 2 × resolution
        ((40, 30), 16, 16, ((21, 16), (16, 16))),  # cover, then centre-crop
        ((40, 30), 12, None, ((16, 12), (16, 12))),  # one side given: keep the aspect
    ],
)
def test_plan_init_size(size, height, width, expected):
    assert plan_init_size(size, factor=2, resolution=16, height=height, width=width) == expected


# ---- long and weighted prompts ----

LONG_PROMPT = "a (red:1.3) square on a blue sky"  # 21 byte tokens: two chunks of the tiny encoder's 14


def test_short_prompts_are_padded_with_empty_chunks_to_the_longest(pipe):
    texts = pipe.encode_prompts([LONG_PROMPT, "", "a cat"])
    empty = pipe.model.text_encoder.encode([""])[0]
    assert texts.shape == (3, 32, 32)
    assert torch.equal(texts[0], pipe.encode_prompt(LONG_PROMPT))
    assert torch.equal(texts[1], torch.cat([empty, empty]))
    assert torch.equal(texts[2, :16], pipe.model.text_encoder.encode(["a cat"])[0])
    assert torch.equal(texts[2, 16:], empty)


def test_a_long_prompt_image_is_the_same_alone_and_in_a_batch(pipe):
    settings = SamplingSettings(steps=2, sampler="unipc", negative_prompt="blurry", **SIZE)
    jobs = [ImageJob(LONG_PROMPT, 1), ImageJob("a cat", 2), ImageJob(LONG_PROMPT, 3)]
    batches = [(batch, images) for batch, images in pipe.generate(jobs, settings, batch_size=3, progress=False)]
    # prompts of other chunk counts never share a batch: padding them would change the short one
    assert [[job.seed for job in batch] for batch, _ in batches] == [[1], [2], [3]]
    alone = pipe([ImageJob(LONG_PROMPT, 1)], settings)
    torch.testing.assert_close(batches[0][1], alone, rtol=0, atol=0)
    literal = pipe([ImageJob(LONG_PROMPT, 1)], SamplingSettings(steps=2, sampler="unipc", negative_prompt="blurry",
                                                                 prompt_weighting=False, **SIZE))
    assert not torch.allclose(literal, alone)
