"""The bench scripts' shared pieces: bf16 kernels emulated in float32, markdown sections, the memory report."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import _bench_common as bench  # noqa: E402


def conv_and_linear_step(x: torch.Tensor, conv: torch.nn.Conv2d, linear: torch.nn.Linear) -> torch.Tensor:
    y = linear(conv(x).flatten(2).transpose(1, 2))
    (y.float() ** 2).sum().backward()
    return y


def test_fp32_matmuls_for_bf16_keep_bf16_tensors_and_match_native_bf16():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    conv, linear = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 5)
    results = {}
    for name in ("native", "emulated"):
        c, l = [copy.deepcopy(m).to(torch.bfloat16) for m in (conv, linear)]
        xb = x.bfloat16().requires_grad_()
        if name == "emulated":
            with bench.Fp32MatmulsForBf16():
                y = conv_and_linear_step(xb, c, l)
        else:
            y = conv_and_linear_step(xb, c, l)
        results[name] = [y, xb.grad, c.weight.grad, l.weight.grad]
    for native, emulated in zip(results["native"], results["emulated"]):
        assert emulated.dtype == torch.bfloat16 and emulated.shape == native.shape
        torch.testing.assert_close(emulated.float(), native.float(), rtol=2e-2, atol=2e-2)


def test_markdown_sections_of_one_script_are_kept_apart(tmp_path):
    path = tmp_path / "benchmarks.md"
    bench.write_markdown_section(path, "bench_x.py (a)", "python scripts/bench_x.py", "first a")
    bench.write_markdown_section(path, "bench_x.py (b)", "python scripts/bench_x.py --b", "first b")
    bench.write_markdown_section(path, "bench_x.py (a)", "python scripts/bench_x.py", "second a")
    text = path.read_text()
    assert "second a" in text and "first b" in text and "first a" not in text
    assert text.index("second a") < text.index("first b")  # a replaced section keeps its place


@pytest.mark.slow
def test_memory_cases_measure_every_optimiser_in_process():
    """Each --memory case of the tiny U-Net builds and steps; its peak covers at least its weights."""
    import bench_train_diffusion as script
    from omegaconf import OmegaConf

    trainer = bench.load_yaml("train", "diffusion_tiny", script.TrainConfig)
    cases = {case.name: case for case in script.memory_cases(trainer)}
    assert {"ours bf16 adamw", "ours bf16 adafactor", "ours bf16 adafactor no-masters", "diffusers bf16 AdamW"} <= set(cases)
    unet = OmegaConf.to_container(OmegaConf.structured(bench.load_yaml("unet", "tiny", script.UNetConfig)))
    payload = script.Payload(unet_config=unet, latent_size=4, batch_size=1, context_length=8, seed=0, device="cpu",
                             cases=cases, emulate_bf16=True)
    for name in ("ours bf16 adafactor no-masters", "diffusers bf16 AdamW"):
        step = script.build_case(payload, name)
        assert torch.isfinite(step()) and step.counts["trainable"] == step.counts["parameters"] > 4_000_000
        peak = bench.measure_in_process(lambda step=step: step, 0, torch.device("cpu"))
        assert peak is None or peak > 0
