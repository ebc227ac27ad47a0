"""`ldm convert`: SD single files / diffusers folders ⇄ ldm bundles, on a tiny random pipeline.

diffusers is the independent reference: its pipeline saves the source folder, loads our export,
and its own `convert_ldm_*` converters read our single files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.bundle import load_bundle
from ldm_cli.cli import app
from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.errors import BundleError, IncompatibleError, MissingWeightsError, RunDirError, UsageError
from ldm_cli.interop.checks import check_autoencoder_weights as _check_autoencoder
from ldm_cli.interop.checks import check_unet_weights as _check_unet
from ldm_cli.interop.configs import autoencoder_from_weights as _autoencoder_from_weights
from ldm_cli.interop.configs import unet_config as _unet_config
from ldm_cli.interop.sd_checkpoint import sd_unet_layout as _sd_unet_layout
from ldm_cli.interop.text_encoder import clip_config as _clip_config
from ldm_cli.interop.convert import (
    ImportOptions,
    convert_model,
    import_checkpoint,
)
from ldm_cli.interop.detect import detect_unet_config
from ldm_cli.interop.export import export_diffusers, export_single_file
from ldm_cli.interop.sd_keys import unet_diffusers_to_sd, unet_sd_to_diffusers, vae_diffusers_to_sd, vae_sd_to_diffusers
from tests.tiny_sd import tiny_sd_parts

PROMPT = "a red circle"


class NotATensor:
    """What a Lightning .ckpt carries besides weights (callbacks, hyper-parameters objects)."""


def quiet(message: str) -> None:
    pass


def folder_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `root`, keyed `<component>/<name>`."""
    tensors = {}
    for file in sorted(root.glob("*/*.safetensors")):
        for key, value in load_file(str(file)).items():
            tensors[f"{file.parent.name}/{key}"] = value
    return tensors


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    """A tiny random SD pipeline saved by diffusers itself: U-Net (32, 64), VAE (8, 16), CLIP width 32."""
    parts = tiny_sd_parts()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(**parts, scheduler=scheduler)
    root = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    pipeline.save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def bundle_dir(diffusers_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny-sd"
    import_checkpoint(diffusers_dir, out, log=quiet)
    return out


@pytest.fixture(scope="module")
def exported_dir(bundle_dir, tmp_path_factory) -> Path:
    return export_diffusers(bundle_dir, tmp_path_factory.mktemp("export") / "tiny-sd", log=quiet)


@pytest.fixture(scope="module")
def single_file(bundle_dir, tmp_path_factory) -> Path:
    return export_single_file(bundle_dir, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors", log=quiet)


@pytest.fixture(scope="module")
def plain_sd_file(single_file, tmp_path_factory) -> Path:
    """The same weights as a file from anyone else: no ldm metadata, plus SD's betas buffer and EMA copy."""
    tensors = load_file(str(single_file))
    unet_prefix = "model.diffusion_model."
    for key in [k for k in tensors if k.startswith(unet_prefix)]:
        tensors["model_ema." + key.replace(".", "")[len("model"):]] = tensors[key] + 1  # LitEma's flat names
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["betas"] = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64).float()  # DDPM's linear schedule
    path = tmp_path_factory.mktemp("plain") / "plain.safetensors"
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------- round trips


def test_diffusers_folder_round_trip_is_bit_identical(diffusers_dir, bundle_dir, exported_dir):
    assert_bit_identical(folder_tensors(exported_dir), folder_tensors(diffusers_dir))
    index = json.loads((exported_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    original_unet = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    exported_unet = json.loads((exported_dir / "unet" / "config.json").read_text())
    for key, value in exported_unet.items():
        if not key.startswith("_"):
            assert original_unet[key] == value, key
    vae = json.loads((exported_dir / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.18215 and vae["sample_size"] == 16 and vae["norm_num_groups"] == 8
    scheduler = json.loads((exported_dir / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset")} == {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
    }
    assert scheduler["clip_sample"] is False and scheduler["set_alpha_to_one"] is False
    with safe_open(str(exported_dir / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ldm_source_bundle"] == load_bundle(bundle_dir).content_hash and metadata["ldm_version"]


def test_imported_bundle_records_what_sampling_needs(bundle_dir):
    bundle = load_bundle(bundle_dir, kind="latent-diffusion")
    meta = bundle.meta
    assert meta["resolution"] == 16 and meta["latent_scale"] == 0.18215
    assert meta["unet"]["block_out_channels"] == [32, 64] and meta["unet"]["cross_attention_dim"] == 32
    assert meta["schedule"]["prediction_type"] == "epsilon" and meta["schedule"]["beta_schedule"] == "scaled_linear"
    assert meta["text_encoder_bundled"] is True and meta["source"]["format"] == "diffusers"
    assert meta["text_encoder"]["pretrained"] == "text_encoder"  # the bundled folder, not a scratch path
    autoencoder = load_autoencoder(bundle_dir / "autoencoder")
    assert autoencoder.latent_scale == 0.18215 and autoencoder.resolution == 16


def test_single_file_round_trip_is_bit_identical_and_matches_diffusers_converters(diffusers_dir, single_file, tmp_path):
    original = load_file(str(single_file))
    reference = folder_tensors(diffusers_dir)
    unet_config = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((diffusers_dir / "vae" / "config.json").read_text())
    # diffusers' own converters read our file back into the source tensors
    unet = convert_ldm_unet_checkpoint(original, unet_config)
    assert_bit_identical({f"unet/{k}": v for k, v in unet.items()}, {k: v for k, v in reference.items() if k.startswith("unet/")})
    vae = convert_ldm_vae_checkpoint(original, vae_config)
    assert_bit_identical({f"vae/{k}": v for k, v in vae.items()}, {k: v for k, v in reference.items() if k.startswith("vae/")})
    clip = convert_ldm_clip_checkpoint(original)
    text = {k: v for k, v in reference.items() if k.startswith("text_encoder/")}
    assert all(torch.equal(v, text["text_encoder/" + k.removeprefix("text_model.")]) for k, v in clip.items())
    assert len(clip) == len(text)
    # and through ldm again: the same bytes out
    bundle = import_checkpoint(single_file, tmp_path / "bundle", ImportOptions(text_encoder=str(diffusers_dir)), log=quiet)
    assert bundle.meta["source"]["format"] == "sd-single-file"
    again = export_single_file(bundle.path, tmp_path / "again.safetensors", log=quiet)
    assert_bit_identical(load_file(str(again)), original)
    with safe_open(str(again), "pt") as handle:
        assert json.loads(handle.metadata()["ldm_model"])["unet"]["attention_head_dim"] == 4


def test_plain_sd_file_detects_architecture_schedule_and_ema(plain_sd_file, diffusers_dir, tmp_path):
    lines: list[str] = []
    bundle = import_checkpoint(plain_sd_file, tmp_path / "ema", ImportOptions(text_encoder=str(diffusers_dir), resolution=32), log=lines.append)
    report = "\n".join(lines)
    assert "EMA: present in the file, used" in report
    assert "channels [32, 64]" in report and "context dim 32" in report and "predicts epsilon" in report
    assert "0.8M parameters" in report and "latent scale 0.18215" in report
    meta = bundle.meta
    assert meta["unet"]["norm_num_groups"] == 32 and meta["unet"]["attention_head_dim"] == 8  # SD v1's, assumed
    assert meta["unet"]["sample_size"] == 16 and meta["resolution"] == 32
    assert load_bundle(bundle.path / "autoencoder").meta["autoencoder"]["norm_num_groups"] == 8
    assert meta["schedule"]["beta_schedule"] == "linear"  # read off the file's betas
    assert (meta["schedule"]["beta_start"], meta["schedule"]["beta_end"]) == (1e-4, 2e-2)
    source = load_file(str(plain_sd_file))
    ema_unet = unet_diffusers_to_sd(bundle.tensors("unet"), meta["unet"])
    reference = convert_ldm_unet_checkpoint(source, json.loads((diffusers_dir / "unet" / "config.json").read_text()), extract_ema=True)
    assert all(torch.equal(bundle.tensors("unet")[k], v) for k, v in reference.items())
    assert all(torch.equal(v, source["model.diffusion_model." + k] + 1) for k, v in ema_unet.items())

    raw = import_checkpoint(plain_sd_file, tmp_path / "raw", ImportOptions(use_ema=False, text_encoder=str(diffusers_dir),
                                                                            prediction_type="v_prediction"), log=quiet)
    assert raw.meta["source"]["ema"] == "present, not used"
    assert raw.meta["schedule"]["prediction_type"] == "v_prediction"
    raw_unet = unet_diffusers_to_sd(raw.tensors("unet"), raw.meta["unet"])
    assert all(torch.equal(v, source["model.diffusion_model." + k]) for k, v in raw_unet.items())


def test_legacy_ckpt_loads_weights_only(single_file, diffusers_dir, tmp_path):
    tensors = load_file(str(single_file))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 3}, ckpt)
    bundle = import_checkpoint(ckpt, tmp_path / "bundle", ImportOptions(text_encoder=str(diffusers_dir)), log=quiet)
    out = export_single_file(bundle.path, tmp_path / "out.safetensors", log=quiet)
    assert_bit_identical(load_file(str(out)), tensors)


def test_ckpt_with_python_objects_is_refused_and_nothing_is_written(single_file, tmp_path):
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": load_file(str(single_file)), "callbacks": NotATensor()}, ckpt)
    result = CliRunner().invoke(app, ["convert", "--from", str(ckpt), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert isinstance(result.exception, BundleError)
    message = str(result.exception)
    assert "ldm does not unpickle code" in message and "NotATensor" in message and ".safetensors" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- equivalence


def test_unet_vae_and_text_encoder_match_diffusers_modules(bundle_dir, exported_dir):
    model = load_latent_diffusion(bundle_dir)
    reference = StableDiffusionPipeline.from_pretrained(exported_dir)
    context = model.text_encoder.encode([PROMPT, ""])
    reference_context, _ = reference.encode_prompt(PROMPT, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(context[:1], reference_context, rtol=0, atol=1e-5)

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        ours = model.unet(latents, timesteps, context)
        theirs = reference.unet(latents, timesteps, encoder_hidden_states=context).sample
        assert ours.std() > 0.1  # a real output, not a degenerate one
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

        images = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
        ours_posterior = model.autoencoder.model.encode(images)
        theirs_posterior = reference.vae.encode(images).latent_dist
        torch.testing.assert_close(ours_posterior.mean, theirs_posterior.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_posterior.std, theirs_posterior.std, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.autoencoder.model.decode(latents), reference.vae.decode(latents).sample, rtol=1e-4, atol=1e-5)


def test_ldm_sampling_equals_diffusers_pipeline(bundle_dir, exported_dir):
    from ldm_cli.sampling.pipeline import ImageJob, SamplingPipeline, SamplingSettings

    pipeline = SamplingPipeline(load_latent_diffusion(bundle_dir))
    settings = SamplingSettings(steps=3, guidance_scale=4.0, sampler="euler", height=16, width=16, timestep_spacing="leading")
    ours = pipeline([ImageJob(PROMPT, seed=7)], settings)

    reference = StableDiffusionPipeline.from_pretrained(exported_dir)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    # the same starting point: ldm starts at x = σ_0 ε, diffusers at init_noise_sigma · latents
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(7))[None]
    sigma = pipeline.sigmas(settings)[0].item()
    theirs = reference(
        PROMPT, num_inference_steps=3, guidance_scale=4.0, height=16, width=16,
        latents=noise * sigma / math.sqrt(sigma**2 + 1), output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    assert theirs.std() > 0.01
    torch.testing.assert_close((ours + 1) / 2, theirs, rtol=0, atol=2e-4)


# --------------------------------------------------------------------------------------------- VAE


def test_standalone_vae_file_and_folder_become_autoencoder_bundles(diffusers_dir, single_file, tmp_path):
    reference = load_file(str(diffusers_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    folder_bundle = import_checkpoint(diffusers_dir / "vae", tmp_path / "from-folder", log=quiet)
    assert folder_bundle.kind == "autoencoder" and folder_bundle.meta["resolution"] == 16
    assert_bit_identical(folder_bundle.tensors("autoencoder"), reference)

    original_layout = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(single_file)).items()
                       if k.startswith("first_stage_model.")}
    vae_file = tmp_path / "vae-ft.safetensors"
    save_file(original_layout, str(vae_file))
    file_bundle = import_checkpoint(vae_file, tmp_path / "from-file", ImportOptions(resolution=64), log=quiet)
    assert_bit_identical(file_bundle.tensors("autoencoder"), reference)
    loaded = load_autoencoder(file_bundle.path)
    assert (loaded.latent_scale, loaded.resolution, loaded.model.config.norm_num_groups) == (0.18215, 64, 8)

    diffusers_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(reference, str(diffusers_file))
    assert_bit_identical(import_checkpoint(diffusers_file, tmp_path / "from-diffusers-file", log=quiet).tensors("autoencoder"), reference)


# ------------------------------------------------------------------------------------------ errors


def test_partial_checkpoint_lists_missing_keys(single_file, diffusers_dir, tmp_path):
    tensors = {k: v for k, v in load_file(str(single_file)).items() if not k.startswith("model.diffusion_model.output_blocks.1.")}
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(BundleError, match=r"missing \(output_blocks\.1\.0\.\*"):
        import_checkpoint(path, tmp_path / "out", ImportOptions(text_encoder=str(diffusers_dir)), log=quiet)
    tensors = load_file(str(single_file))
    del tensors["first_stage_model.decoder.conv_out.bias"]
    save_file(tensors, str(path))
    with pytest.raises(BundleError, match=r"VAE weights do not fit the model: 1 missing \(decoder.conv_out.bias\)"):
        import_checkpoint(path, tmp_path / "out", ImportOptions(text_encoder=str(diffusers_dir)), log=quiet)
    assert not (tmp_path / "out").exists()


def test_single_file_without_tokenizer_or_text_encoder(single_file, diffusers_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match="--text-encoder") as error:
        import_checkpoint(single_file, tmp_path / "out", log=quiet)  # CLIP weights inside, tokenizer nowhere
    assert "\n" not in str(error.value)
    no_text = {k: v for k, v in load_file(str(single_file)).items() if not k.startswith("cond_stage_model.")}
    path = tmp_path / "no-text.safetensors"
    save_file(no_text, str(path))
    with pytest.raises(UsageError, match="32-wide text embeddings; name one with --text-encoder"):
        import_checkpoint(path, tmp_path / "out", log=quiet)
    bundle = import_checkpoint(path, tmp_path / "out", ImportOptions(text_encoder=str(diffusers_dir)), log=quiet)
    assert bundle.meta["text_encoder_bundled"] and load_latent_diffusion(bundle.path).text_encoder.width == 32
    # a hub id is named, not bundled; exporting it offline then says how to get it, writing nothing
    named = import_checkpoint(path, tmp_path / "named", ImportOptions(text_encoder="someone/clip-text"), log=quiet)
    assert not named.meta["text_encoder_bundled"] and named.meta["text_encoder"]["pretrained"] == "someone/clip-text"
    with pytest.raises(MissingWeightsError, match="someone/clip-text"):
        export_diffusers(named.path, tmp_path / "named-diffusers", log=quiet)
    assert not (tmp_path / "named-diffusers").exists()


def test_half_precision_folder_keeps_its_dtype(diffusers_dir, tmp_path):
    import shutil

    half = tmp_path / "fp16"
    shutil.copytree(diffusers_dir, half)
    for file in half.glob("*/*.safetensors"):
        save_file({k: v.half() for k, v in load_file(str(file)).items()}, str(file))
    bundle = import_checkpoint(half, tmp_path / "bundle", log=quiet)
    exported = export_diffusers(bundle.path, tmp_path / "out", log=quiet)
    assert_bit_identical(folder_tensors(exported), folder_tensors(half))


def test_wrong_sources_and_targets_give_one_line_errors(bundle_dir, tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"definitely not a model " * 40)
    with pytest.raises(BundleError, match="neither a safetensors file nor a PyTorch checkpoint"):
        convert_model(junk, tmp_path / "a", log=quiet)
    (tmp_path / "folder").mkdir()
    with pytest.raises(BundleError, match="no model_index.json"):
        convert_model(tmp_path / "folder", tmp_path / "a", log=quiet)
    with pytest.raises(BundleError, match="'autoencoder' bundle; --to diffusers"):
        convert_model(bundle_dir / "autoencoder", tmp_path / "a", to="diffusers", log=quiet)
    with pytest.raises(UsageError, match="already an ldm bundle"):
        convert_model(bundle_dir, tmp_path / "a", log=quiet)
    with pytest.raises(RunDirError, match="already exists"):
        convert_model(bundle_dir, bundle_dir / "autoencoder", to="diffusers", log=quiet)
    with pytest.raises(UsageError, match="must end in .safetensors"):
        convert_model(bundle_dir, tmp_path / "model.ckpt", to="sd-single-file", log=quiet)
    with pytest.raises(UsageError, match="--to must be one of"):
        convert_model(bundle_dir, tmp_path / "a", to="onnx", log=quiet)
    assert not (tmp_path / "a").exists()


def test_unsupported_diffusers_unet_is_refused(diffusers_dir, tmp_path):
    import shutil

    copy = tmp_path / "sdxl-like"
    shutil.copytree(diffusers_dir, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    with pytest.raises(IncompatibleError, match="addition_embed_type='text_time'"):
        import_checkpoint(copy, tmp_path / "out", log=quiet)


# ------------------------------------------------------------------------------------- CLI and SD1.5


def test_cli_import_and_both_exports(diffusers_dir, tmp_path, ldm):
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--from", str(diffusers_dir), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    assert "U-Net: 0.8M parameters" in result.output and "wrote latent-diffusion bundle" in result.output
    result = runner.invoke(app, ["convert", "--from", str(tmp_path / "bundle"), "--to", "diffusers", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "model_index.json").is_file()
    result = runner.invoke(app, ["convert", "--from", str(tmp_path / "bundle"), "--to", "sd-single-file", "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    assert "model.diffusion_model.conv_in" not in load_file(str(tmp_path / "m.safetensors"))
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(str(tmp_path / "m.safetensors"))
    # a foreign source straight to diffusers goes through a temporary bundle
    result = runner.invoke(app, ["convert", "--from", str(tmp_path / "m.safetensors"), "--to", "diffusers",
                                 "--text-encoder", str(diffusers_dir), "--out", str(tmp_path / "d2")])
    assert result.exit_code == 0, result.output
    assert_bit_identical(folder_tensors(tmp_path / "d2"), folder_tensors(tmp_path / "d"))

    # the real entry point: one `error:` line and the error's exit code
    code, _, err = ldm("convert", "--from", tmp_path / "bundle" / "autoencoder", "--to", "diffusers", "--out", tmp_path / "x")
    assert code == BundleError.exit_code
    error_lines = err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ") and "'latent-diffusion'" in error_lines[0]


def test_sd15_sized_checkpoint_is_read_correctly():
    """Full-size SD v1.5 / SD 2 key sets on the meta device: layout, config and checks (no memory)."""
    for config in ({}, {"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "cross_attention_dim": 1024}):
        with torch.device("meta"):
            reference = UNet2DConditionModel(**config)
        original = unet_diffusers_to_sd(reference.state_dict(), reference.config)
        mapped = unet_sd_to_diffusers(original, _sd_unet_layout(original))
        detected = detect_unet_config(mapped)
        unet_config = _unet_config({**detected, "norm_num_groups": 32})
        _check_unet(mapped, unet_config)
        for name in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim"):
            expected = reference.config[name]
            assert getattr(unet_config, name) == (list(expected) if isinstance(expected, (list, tuple)) else expected), name
        assert unet_config.layers_per_block == 2 and unet_config.cross_attention_dim == reference.config.cross_attention_dim

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    autoencoder = _autoencoder_from_weights(vae_sd_to_diffusers(vae_diffusers_to_sd(vae.state_dict())), {}, None)
    _check_autoencoder(autoencoder.weights, autoencoder.config)
    assert autoencoder.config.norm_num_groups == 32 and autoencoder.resolution == 512 and autoencoder.latent_scale == 0.18215

    clip_l = {"text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, device="meta"),
              "text_model.embeddings.position_embedding.weight": torch.empty(77, 768, device="meta"),
              "text_model.encoder.layers.0.mlp.fc1.weight": torch.empty(3072, 768, device="meta")}
    clip_l.update({f"text_model.encoder.layers.{i}.mlp.fc2.weight": torch.empty(768, 3072, device="meta") for i in range(12)})
    tokenizer = type("Tokenizer", (), {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407})()
    config = _clip_config(clip_l, tokenizer, None)
    assert (config.num_attention_heads, config.num_hidden_layers, config.intermediate_size, config.hidden_act) == (12, 12, 3072, "quick_gelu")


class RunsACommand:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_would_run_code_is_refused_saying_what_it_would_run(tmp_path, legacy):
    from ldm_cli.interop.single_file import read_checkpoint

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"w": torch.ones(2), "x": RunsACommand()}, ckpt, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(BundleError, match=r"it would run code: posix\.system\) and ldm does not unpickle code"):
        read_checkpoint(ckpt)
