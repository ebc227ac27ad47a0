"""Device and numeric precision: which device, which autocast, whether a grad scaler is needed."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ldm_cli.errors import ConfigError, UsageError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_has_native_bf16() -> bool:
    """True on GPUs with bf16 arithmetic (Ampere and newer); pre-Ampere cards (V100, T4) only emulate
    it, slowly, so they are better served by fp16 with a grad scaler."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.5 has no `including_emulation`
        return torch.cuda.get_device_capability() >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn `auto` into a concrete precision; refuse fp16 on the CPU (no grad scaler there)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_native_bf16() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Bitwise-reproducible kernels while training (exact resume on CUDA): deterministic algorithms,
    cuBLAS's fixed workspace, no cuDNN autotuning; the previous settings come back afterwards.
    CPU kernels are deterministic already; on a GPU this costs speed."""
    if not enabled:
        yield
        return
    # cuBLAS reads this when it creates its handle, before the first matrix product
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
