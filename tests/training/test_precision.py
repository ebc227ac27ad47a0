"""Precision and kernel choices: `auto` on GPUs without native bf16, deterministic kernels."""

import os

import torch

from ldm_cli.training.precision import deterministic_kernels, resolve_precision


def test_auto_precision_uses_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    # a V100 or T4: torch counts emulated bf16 as supported unless asked not to
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and newer
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_deterministic_kernels_are_switched_on_for_the_run_and_restored(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic_kernels(False):
        assert torch.are_deterministic_algorithms_enabled() == before
