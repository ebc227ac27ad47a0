"""`compile=true`: the U-Net through torch.compile for sampling, with its weights frozen into the graph.

Inductor's "freezing" treats the (inference-only) weights as constants: it folds them and, on the
CPU, pre-packs them into oneDNN's blocked layouts once instead of on every call, and it fuses the
element-wise work between the matmuls. It pays off for runs of many images: the one-time compilation
and the per-step gain are measured by `scripts/bench_sample.py --compile` (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_for_inference(module: nn.Module) -> Callable[..., Any]:
    """`module` compiled for inference; where compilation fails (no C++ compiler, an unsupported
    platform) it warns once and runs `module` eagerly, so a long sampling job is never lost to it."""
    import torch._inductor.config as inductor_config  # here: inductor is heavy, and only compile=true needs it

    # torch's C++ toolchain probe warns about CUDA_HOME on CPU-only machines: not the user's concern
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    compiled = torch.compile(module, dynamic=False)
    run: list[Callable[..., Any]] = [compiled]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if run[0] is module:
            return module(*args, **kwargs)
        try:
            # read when the first call compiles (torch.compile's `options` do not reach freezing)
            with inductor_config.patch(freezing=True):
                return run[0](*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure; a genuine model error recurs eagerly
            log.warning("torch.compile failed (%s: %s); sampling continues without compile=true",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            run[0] = module
            return module(*args, **kwargs)

    return forward
