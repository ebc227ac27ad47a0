"""`ldm sample` / `ldm img2img` end to end: files, metadata, replay, and one-line errors that write nothing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_cli.bundle import file_sha256
from ldm_cli.sampling.metadata import read_metadata
from tests.sampling.helpers import pixels, write_tiny_latent_diffusion


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_latent_diffusion(tmp_path_factory.mktemp("cli") / "model")


def test_sample_writes_pngs_with_metadata_and_never_overwrites(ldm, model_dir, tmp_path):
    out = tmp_path / "out"
    command = ["sample", "--model", model_dir, "--prompt", "a red circle", "--prompt", "", "-n", "2", "--steps", "3",
               "--seed", "7", "--precision", "fp32", "--out", out, "--json", "--grid"]
    code, stdout, _ = ldm(*command)
    assert code == 0, stdout
    names = ["00000-7.png", "00001-8.png", "00002-9.png", "00003-10.png"]
    assert sorted(p.name for p in out.glob("0*.png")) == names
    assert (out / "grid-00000-00003.png").is_file() and "wrote 4 image(s)" in stdout

    meta = read_metadata(out / "00003-10.png")
    assert meta["prompt"] == "" and meta["seed"] == 10 and meta["steps"] == 3 and meta["mode"] == "txt2img"
    assert meta["model_hash"] == json.loads((model_dir / "bundle.json").read_text())["content_hash"]
    assert (meta["height"], meta["width"], meta["sampler"], meta["precision"]) == (16, 16, "dpmpp_2m", "fp32")
    assert json.loads((out / "00003-10.json").read_text()) == meta
    with Image.open(out / "00000-7.png") as image:
        parameters = image.text["parameters"]
    assert parameters.startswith("a red circle\nSteps: 3, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 7, Size: 16x16")

    # the same command again: new names after the highest index, byte-identical files
    assert ldm(*command)[0] == 0
    assert (out / "00004-7.png").read_bytes() == (out / "00000-7.png").read_bytes()
    assert (out / "00007-10.png").read_bytes() == (out / "00003-10.png").read_bytes()
    assert not np.array_equal(pixels(out / "00000-7.png"), pixels(out / "00001-8.png"))


@pytest.mark.parametrize(("sampler", "batch_size"), [("dpmpp_2m", "3"), ("euler_ancestral", "2")])
def test_replay_gives_identical_pixels(ldm, model_dir, tmp_path, sampler, batch_size):
    out = tmp_path / "out"
    code, stdout, _ = ldm("sample", "--model", model_dir, "--prompt", "a red circle", "--prompt", "a blue square",
                          "-n", "2", "--batch-size", batch_size, "--steps", "4", "--sampler", sampler, "--seed", "100",
                          "--negative-prompt", "green", "karras_sigmas=true", "--out", out)
    assert code == 0, stdout
    original = out / "00001-101.png"  # the middle of the first batch
    code, stdout, _ = ldm("sample", "--replay", original, "--out", tmp_path / "replayed")  # model from the metadata
    assert code == 0, stdout
    replayed = tmp_path / "replayed" / "00000-101.png"
    assert np.array_equal(pixels(replayed), pixels(original))
    assert read_metadata(replayed)["karras_sigmas"] is True
    assert "pixels may differ" not in stdout  # same version, device and model: nothing to note


def test_replay_notes_an_image_made_by_another_ldm_version(ldm, model_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = ldm("sample", "--model", model_dir, "--prompt", "a red circle", "--steps", "2", "--out", out)
    assert code == 0, stdout
    original = out / "00000-0.png"
    with Image.open(original) as image:
        metadata = {**read_metadata(original), "ldm_version": "0.0.1"}
        info = PngImagePlugin.PngInfo()
        info.add_text("ldm", json.dumps(metadata))
        image.save(tmp_path / "old.png", pnginfo=info)
    code, stdout, _ = ldm("sample", "--replay", tmp_path / "old.png", "--out", tmp_path / "replayed")
    assert code == 0, stdout
    assert "was made with ldm 0.0.1, this is ldm " in stdout and "pixels may differ slightly" in stdout


@pytest.mark.parametrize(
    ("changes", "exit_code", "message"),
    [
        ({"height": 100000, "width": 100000}, 2, "--height must be between 1 and 4096"),
        ({"guidance_scale": float("nan")}, 2, "--guidance-scale must be a finite number"),
        ({"steps": 10**9, "karras_sigmas": True}, 2, "exceeds the limit of 1000"),
        ({"steps": "many"}, 3, "steps='many', not an integer"),
        ({"batch": {"seeds": list(range(20000)), "prompts": ["x"] * 20000}}, 2, "batch of 20000, over the limit of 256"),
        ({"batch": {"seeds": "0"}}, 3, "the batch recorded in"),
    ],
)
def test_replayed_metadata_is_checked_like_options(ldm, model_dir, tmp_path, changes, exit_code, message):
    out = tmp_path / "out"
    assert ldm("sample", "--model", model_dir, "--prompt", "a red circle", "--steps", "2", "--out", out)[0] == 0
    with Image.open(out / "00000-0.png") as image:
        info = PngImagePlugin.PngInfo()
        info.add_text("ldm", json.dumps({**read_metadata(out / "00000-0.png"), **changes}))
        image.save(tmp_path / "tampered.png", pnginfo=info)
    code, _, stderr = ldm("sample", "--replay", tmp_path / "tampered.png", "--out", tmp_path / "replayed")
    assert code == exit_code
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "replayed").exists()


def test_img2img_on_a_folder_notes_resizes_and_replays(ldm, model_dir, tmp_path):
    inits = tmp_path / "inits"
    inits.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (18, 20, 4), dtype=np.uint8), "RGBA").save(inits / "a.png")
    Image.fromarray(rng.integers(0, 255, (15, 17), dtype=np.uint8), "L").save(inits / "b.jpg")
    out = tmp_path / "out"
    code, stdout, _ = ldm("img2img", "--model", model_dir, "--init", inits, "--prompt", "a red circle", "-n", "2",
                          "--strength", "0.6", "--steps", "5", "--seed", "3", "--out", out, "--grid")
    assert code == 0, stdout
    assert "note: init image b.jpg is 17x15; centre-cropped to 16x14" in stdout
    sizes = {path.name: Image.open(path).size for path in sorted(out.glob("0*.png"))}
    assert sizes == {"00000-3.png": (20, 18), "00001-4.png": (20, 18), "00002-5.png": (16, 14), "00003-6.png": (16, 14)}
    meta = read_metadata(out / "00002-5.png")
    assert meta["mode"] == "img2img" and meta["strength"] == 0.6
    assert meta["init_sha256"] == file_sha256(inits / "b.jpg") and meta["init_image"] == str((inits / "b.jpg").resolve())
    assert "Denoising strength: 0.6" in Image.open(out / "00002-5.png").text["parameters"]

    assert ldm("sample", "--replay", out / "00003-6.png", "--out", out)[0] == 0
    assert np.array_equal(pixels(out / "00004-6.png"), pixels(out / "00003-6.png"))


def test_img2img_strength_zero_keeps_the_image(ldm, model_dir, tmp_path):
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    Image.fromarray(smooth).save(tmp_path / "init.png")
    code, _, _ = ldm("img2img", "--model", model_dir, "--init", tmp_path / "init.png", "--prompt", "x",
                     "--strength", "0", "--out", tmp_path / "out")
    assert code == 0
    # the autoencoder's reconstruction: no denoising step ran, so the seed makes no difference
    assert ldm("img2img", "--model", model_dir, "--init", tmp_path / "init.png", "--prompt", "x",
               "--strength", "0", "--seed", "99", "--out", tmp_path / "out")[0] == 0
    assert np.array_equal(pixels(tmp_path / "out" / "00000-0.png"), pixels(tmp_path / "out" / "00001-99.png"))


def test_long_prompt_is_encoded_whole_in_chunks(ldm, model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        code, _, _ = ldm("sample", "--model", model_dir, "--prompt", "a very long prompt " * 10, "--steps", "1",
                         "--out", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "00000-0.png").is_file()
    assert "truncated" not in caplog.text


def make_error_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "broken.png").write_text("not an image")
    Image.new("RGB", (16, 16)).save(tmp_path / "plain.png")
    return {"broken": tmp_path / "broken.png", "plain": tmp_path / "plain.png"}


BASE = ["--prompt", "a red circle", "--steps", "2"]


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["sample", "--model", "{model}", *BASE, "--sampler", "plms"], 2, "unknown sampler 'plms'; choose one of ddim, ddpm"),
        (["sample", "--model", "{model}", *BASE, "--sampler", "euler", "--eta", "1"], 2, "takes no --eta"),
        (["sample", "--model", "{model}", "--prompt", "x", "--steps", "0"], 2, "--steps must be a positive integer"),
        (["sample", "--model", "{model}", *BASE, "--height", "15"], 2, "height 15 is not a multiple of 2"),
        (["sample", "--model", "{model}", *BASE, "--width", "2"], 2, "width 2 is too small"),
        (["sample", "--model", "{model}", *BASE, "-n", "0"], 2, "--num-images must be a positive integer"),
        (["sample", "--model", "{model}", "--steps", "2"], 2, "give --prompt TEXT"),
        (["sample", "--model", "{model}", "--prompt-file", "{missing}", "--steps", "2"], 2, "cannot read --prompt-file"),
        (["sample", "--model", "{model}/autoencoder", *BASE], 4, "is a 'autoencoder' bundle, but this command needs a 'latent-diffusion' bundle"),
        (["sample", "--model", "{missing}", *BASE], 4, "does not exist"),
        (["sample", *BASE], 2, "--model is required"),
        (["sample", "--model", "{model}", *BASE, "bogus_key=1"], 2, "bogus_key"),
        (["sample", "--replay", "{plain}"], 3, "has no 'ldm' metadata"),
        (["sample", "--model", "{model}", *BASE, "--guidance-scale", "nan"], 2, "--guidance-scale must be a finite number"),
        (["sample", "--model", "{model}", *BASE, "--sampler", "ddim", "--eta", "nan"], 2, "--eta must be a finite number"),
        (["sample", "--model", "{model}", "--prompt", "x", "--steps", "1000000000", "karras_sigmas=true"], 2,
         "exceeds the limit of 1000 (raise it with max_steps=N)"),
        (["sample", "--model", "{model}", *BASE, "--height", "100000"], 2, "--height must be between 1 and 4096"),
        (["sample", "--model", "{model}", *BASE, "--batch-size", "20000"], 2, "--batch-size must be between 1 and 256"),
        (["img2img", "--model", "{model}", "--init", "{plain}", *BASE, "--strength", "nan"], 2, "--strength must be a finite number"),
        (["img2img", "--model", "{model}", "--init", "{plain}", *BASE, "--strength", "1.5"], 2, "--strength must be between 0 and 1"),
        (["img2img", "--model", "{model}", "--init", "{broken}", *BASE], 3, "cannot read image"),
        (["img2img", "--model", "{model}", "--init", "{missing}", *BASE], 3, "init image not found"),
        (["img2img", "--model", "{model}", "--init", "{plain}", *BASE, "--height", "13"], 2, "not a multiple of 2"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ldm, model_dir, tmp_path, args, exit_code, message):
    paths = {"model": model_dir, "missing": tmp_path / "missing", **make_error_inputs(tmp_path)}
    out = tmp_path / "out"
    code, _, stderr = ldm(*[arg.format(**paths) for arg in args], "--out", out)
    assert code == exit_code
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr  # one line
    assert not out.exists()


def test_console_script_reports_an_unreadable_init_image(model_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ldm_script = Path(sys.executable).parent / "ldm"
    result = subprocess.run(
        [str(ldm_script), "img2img", "--model", str(model_dir), "--init", str(tmp_path / "broken.png"),
         "--prompt", "x", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot read image {tmp_path / 'broken.png'}")
    assert not (tmp_path / "out").exists()


def test_show_config_needs_no_out_but_sampling_does(ldm, model_dir):
    code, stdout, _ = ldm("sample", "--show-config", "compile=true", "karras_sigmas=true")
    assert code == 0
    assert "compile: true" in stdout and "karras_sigmas: true" in stdout and "tile_decode_above: 1024" in stdout
    code, _, stderr = ldm("sample", "--model", model_dir, "--prompt", "a red circle")
    assert code == 2 and stderr == "error: --out is required: the folder to write the images to\n"
    code, _, stderr = ldm("img2img", "--model", model_dir, "--init", model_dir, "--prompt", "a red circle")
    assert code == 2 and "--out is required" in stderr
