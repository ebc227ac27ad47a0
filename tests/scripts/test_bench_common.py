"""The bench scripts' shared pieces: bf16 kernels emulated in float32, markdown sections, the memory report."""

from __future__ import annotations

import copy
import subprocess
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
def test_memory_report_of_the_tiny_unet_names_every_optimiser(tmp_path):
    out = tmp_path / "benchmarks.md"
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_train_diffusion.py"), "--memory", "--threads", "1",
                             "--resolution", "4", "--markdown", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[2] if line.startswith("ours") else "diffusers": line for line in result.stdout.splitlines()
            if line.startswith(("ours bf16", "diffusers bf16"))}
    assert {"adamw", "adafactor", "diffusers"} <= set(rows)
    assert "ours bf16 adafactor no-masters" in result.stdout and "1.00x" in rows["diffusers"]
    section = out.read_text()
    assert "## bench_train_diffusion.py (tiny memory)" in section and "adafactor no-masters vs diffusers" in section
