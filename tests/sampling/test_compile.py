"""`compile=true`: the compiled U-Net samples the same images, falls back to eager where compilation
fails, and is recorded in the metadata so a replay compiles too."""

import logging

import numpy as np
import pytest
import torch

from ldm_cli.diffusion.load import load_latent_diffusion
from ldm_cli.sampling.metadata import read_metadata
from ldm_cli.sampling.pipeline import ImageJob, SamplingPipeline, SamplingSettings
from tests.sampling.helpers import pixels, write_tiny_latent_diffusion

SETTINGS = SamplingSettings(steps=3, guidance_scale=5.0, sampler="euler", height=16, width=16)
JOBS = [ImageJob("a red circle", 7), ImageJob("a blue square", 8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_latent_diffusion(tmp_path_factory.mktemp("compile") / "model")


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(model_dir, monkeypatch, caplog):
    calls = []

    def broken_compile(module, **options):
        def compiled(*args, **kwargs):
            calls.append(options)
            raise RuntimeError("C++ compile error: cannot find cl.exe")
        return compiled

    # the fallback runs the plain module, without the packed weights and NHWC layout of eager CPU pipelines
    eager = SamplingPipeline(load_latent_diffusion(model_dir), "cpu", "fp32", prepack=False, channels_last=False)(JOBS, SETTINGS)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        fallen_back = SamplingPipeline(load_latent_diffusion(model_dir), "cpu", "fp32", compile=True)(JOBS, SETTINGS)
    assert len(calls) == 1 and calls[0] == {"dynamic": False}  # tried once, then never again
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert warnings == ["torch.compile failed (RuntimeError: C++ compile error: cannot find cl.exe); "
                        "sampling continues without compile=true"]
    # the same numbers up to rounding: the fallback runs the plain U-Net on the latent once per text
    torch.testing.assert_close(fallen_back, eager, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_sampling_matches_eager_and_replays(ldm, model_dir, tmp_path, caplog):  # noqa: F811
    eager = SamplingPipeline(load_latent_diffusion(model_dir), "cpu", "fp32")(JOBS, SETTINGS)
    compiled_pipeline = SamplingPipeline(load_latent_diffusion(model_dir), "cpu", "fp32", compile=True)
    with caplog.at_level(logging.WARNING):
        compiled = compiled_pipeline(JOBS, SETTINGS)
    assert not [r for r in caplog.records if "torch.compile failed" in r.getMessage()]  # really compiled
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)

    out = tmp_path / "out"
    code, stdout, _ = ldm("sample", "--model", model_dir, "--prompt", "a red circle", "--steps", "3", "--seed", "5",
                          "--device", "cpu", "--precision", "fp32", "--out", out, "compile=true")
    assert code == 0, stdout
    original = out / "00000-5.png"
    assert read_metadata(original)["compiled"] is True
    code, stdout, _ = ldm("sample", "--replay", original, "--out", tmp_path / "replayed")
    assert code == 0, stdout
    replayed = tmp_path / "replayed" / "00000-5.png"
    assert read_metadata(replayed)["compiled"] is True
    assert np.array_equal(pixels(replayed), pixels(original))
