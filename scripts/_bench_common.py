"""Shared pieces of the benchmark scripts: environment header, interleaved timing, peak memory, tables.

Timing: every case is warmed up, then the cases run in interleaved rounds (A B C, then C B A, ...)
so that drift in machine load hits all of them alike; each case reports the median of its rounds.

Peak memory (`measure_memory`): each case is built from nothing, warmed up, then run once more;
its peak is the highest memory in use during that call above the memory in use before the case was
built: weights, optimizer state and caches, plus the call's activations, gradients and temporaries.
On CUDA these are `torch.cuda` allocated bytes, measured in this process. On the CPU they are
resident set sizes (RSS) of a fresh `spawn`ed process per case, so that no case inherits another's
allocations or one-time caches; the peak comes from the kernel's high-water mark (VmHWM), reset
right before the measured call, after returning freed heap pages to the system (malloc_trim).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import gc
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
PRECISIONS = ("fp32", "bf16")

# A case builder makes everything one case needs and returns the call to measure (a closure holding it).
Builder = Callable[[], Callable[[], Any]]
CaseBuilder = Callable[[Any, str], Callable[[], Any]]  # build_case(payload, name), module-level (spawn pickles it)


# -------------------------------------------------------------------------------------- arguments


def add_common_arguments(
    parser: argparse.ArgumentParser, presets: dict[str, str], default_preset: str,
    resolution_help: str = "image side in pixels (default: the preset's)", steps_means_repeats: bool = True,
) -> None:
    """--preset, --batch-size, --resolution, --repeats (alias --steps), --warmup, --device, --precision, --threads."""
    preset_help = "; ".join(f"{name}: {text}" for name, text in presets.items())
    parser.add_argument("--preset", choices=list(presets), default=default_preset, help=f"architecture size ({preset_help})")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--resolution", type=int, default=None, help=resolution_help)
    parser.add_argument("--repeats", *(["--steps"] if steps_means_repeats else []), dest="repeats", type=int, default=None,
                        help="measured repetitions per case; the median is reported (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured repetitions per case first (default 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", nargs="?", const=str(DOCS), default=None, metavar="FILE",
                        help=f"also write this run's report as the script's section of FILE (default {DOCS.relative_to(ROOT)})")


def precisions(choice: str) -> list[str]:
    return list(PRECISIONS) if choice == "both" else [choice]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    return torch.device(name)


def setup(args: argparse.Namespace, section: str = "") -> torch.device:
    """Threads, device, and a header saying what this run measures on; with --markdown, everything printed
    from here on also goes to the script's section of the markdown file when the script ends (one section
    per `section`, by default "--preset NAME"; e.g. "--preset sd15 --memory" where modes report different things)."""
    if getattr(args, "markdown", None):
        preset = getattr(args, "preset", None)
        _record_markdown(Path(args.markdown), section or (f"--preset {preset}" if preset else ""))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    print_environment(device)
    return device


# ------------------------------------------------------------------------------------ environment


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _cpu_bf16() -> str:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        found = [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]
        return ", ".join(found) if found else "no native bf16"
    return "unknown"


def _load_average() -> float | None:
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def print_environment(device: torch.device) -> None:
    import diffusers

    from ldm_cli import __version__

    busy = _load_average()
    load = "" if busy is None else f", load average {busy:.1f}"
    print(f"ldm {__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"cpu: {_cpu_name()} ({os.cpu_count()} cores, {_cpu_bf16()}{load}); torch threads: {torch.get_num_threads()}")
    if device.type == "cpu" and busy is not None and busy + torch.get_num_threads() > (os.cpu_count() or 1) + 0.5:
        print(f"warning: load average {busy:.1f} on {os.cpu_count()} cores: other processes compete for the cores, so "
              "timings are noisy; with several torch threads every parallel op also waits for its slowest thread, "
              "which can slow small ops many-fold (use --threads 1, or a quiet machine)")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        print(f"device: cuda ({properties.name}, {properties.total_memory / 2**30:.0f} GiB)")
    else:
        print("device: cpu")
    print()


# ---------------------------------------------------------------------------------------- presets


def load_yaml(group: str, name: str, schema: type) -> Any:
    """configs/<group>/<name>.yaml as the dataclass `schema` (the packaged presets, no Hydra composition)."""
    from omegaconf import OmegaConf

    from ldm_cli.config import CONFIG_DIR, from_dict

    return from_dict(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml")), schema)


# ----------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float  # seconds per call: what ratios are computed from
    best: float  # the fastest call: less sensitive to other load on a shared machine


def interleaved_timings(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """Seconds per call of each case, measured in alternating-order rounds (A B, B A, ...)."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]  # cancels linear drift in machine load
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(values), min(values)) for name, values in seconds.items()}


# ------------------------------------------------------------------------------ bf16 without bf16


def _upcast(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else value


def _downcast(value: Any) -> Any:
    return value.bfloat16() if isinstance(value, torch.Tensor) and value.dtype == torch.float32 else value


class Fp32MatmulsForBf16(TorchDispatchMode):
    """Runs bf16 matmuls and convolutions (forward and backward) as float32 kernels on upcast copies and
    rounds their results back to bf16: on CPUs without native bf16 (no AVX512-BF16 or AMX) oneDNN's
    emulated bf16 kernels run below 1 GFLOP/s, which makes one SD-1.5-size bf16 step take hours. Every
    tensor kept between ops (weights, activations saved for backward, gradients) stays bf16, so the peak
    memory is a bf16 run's plus one op's float32 operands at a time."""

    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.OPS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            return tree_map(_downcast, func(*tree_map(_upcast, args), **tree_map(_upcast, kwargs)))
        return func(*args, **kwargs)


def emulate_bf16(device: torch.device) -> bool:
    """True on CPUs where bf16 matmuls are emulated (no AVX512-BF16 or AMX flag in /proc/cpuinfo)."""
    return device.type == "cpu" and _cpu_bf16() == "no native bf16"


# ----------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the kernel: RSS then means "in use"


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_in_process(build: Builder, warmup: int, device: torch.device) -> int | None:
    """Peak bytes of one case built and run here (see the module docstring); None where not measurable."""
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        call = build()
        for _ in range(warmup):
            call()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
        del call
        gc.collect()
        torch.cuda.empty_cache()
        return peak
    _release_freed_memory()
    start = _status_kib("VmRSS") * 1024
    call = build()
    for _ in range(warmup):
        call()
    _release_freed_memory()
    if not _reset_peak_rss():
        return None
    call()
    peak = _status_kib("VmHWM") * 1024 - start
    del call
    _release_freed_memory()
    return peak


def _memory_child(sender, build_case: CaseBuilder, payload: Any, name: str, warmup: int, threads: int) -> None:
    torch.set_num_threads(threads)
    import diffusers  # imported before the baseline, so that neither side is charged for importing it

    for class_name in ("AutoencoderKL", "UNet2DConditionModel", "StableDiffusionPipeline"):
        getattr(diffusers, class_name)  # diffusers imports its submodules lazily
    sender.send(measure_in_process(lambda: build_case(payload, name), warmup, torch.device("cpu")))


def _measure_in_fresh_process(build_case: CaseBuilder, payload: Any, name: str, warmup: int) -> int | None:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_memory_child, args=(sender, build_case, payload, name, warmup, torch.get_num_threads()))
    process.start()
    while not receiver.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"the memory measurement of {name!r} died (exit code {process.exitcode})")
    reading = receiver.recv()
    process.join()
    return reading


def _isolated_child(sender, build_case: CaseBuilder, payload: Any, name: str, repeats: int, warmup: int, threads: int) -> None:
    torch.set_num_threads(threads)
    import diffusers

    for class_name in ("AutoencoderKL", "UNet2DConditionModel", "StableDiffusionPipeline"):
        getattr(diffusers, class_name)
    _release_freed_memory()
    start = _status_kib("VmRSS") * 1024
    call = build_case(payload, name)
    flops = None
    for index in range(warmup):
        if index == 0:
            flops = count_flops(call)
        else:
            call()
    _release_freed_memory()
    measurable = _reset_peak_rss()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    peak = _status_kib("VmHWM") * 1024 - start if measurable else None
    sender.send(Isolated(Timing(statistics.median(seconds), min(seconds)), peak, flops, getattr(call, "counts", {})))


@dataclass
class Isolated:
    timing: Timing
    peak: int | None  # bytes, RSS high-water mark of the timed calls above the RSS before the case was built
    flops: int | None  # of one call, counted during the first warm-up call (None without warm-up)
    counts: dict[str, int]  # the call's own `counts` attribute, if any (e.g. parameter counts)


def isolated_timings(
    names: list[str], build_case: CaseBuilder, payload: Any, repeats: int, warmup: int
) -> dict[str, Isolated]:
    """Seconds per call and peak RSS of each case, one fresh spawned process per case, one case after the
    other (for cases too large to be held in memory together; CPU only): `warmup` calls (the first one
    also counts FLOPs), then `repeats` timed calls."""
    context = multiprocessing.get_context("spawn")
    results = {}
    for name in names:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_isolated_child,
                                  args=(sender, build_case, payload, name, repeats, warmup, torch.get_num_threads()))
        process.start()
        while not receiver.poll(1.0):
            if not process.is_alive():
                raise RuntimeError(f"the measurement of {name!r} died (exit code {process.exitcode})")
        results[name] = receiver.recv()
        process.join()
        print(f"  {name}: {results[name].timing.median:.1f} s per step, peak {mib(results[name].peak)} MiB", flush=True)
    return results


def measure_memory(
    names: list[str], build_case: CaseBuilder, payload: Any, warmup: int, device: torch.device
) -> dict[str, int | None]:
    """Peak bytes of each case (see the module docstring). `build_case(payload, name)` returns the call to
    measure; on the CPU it runs in a fresh spawned process per case, so it must be a module-level function."""
    if device.type == "cuda":
        return {name: measure_in_process(lambda name=name: build_case(payload, name), warmup, device) for name in names}
    return {name: _measure_in_fresh_process(build_case, payload, name, warmup) for name in names}


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return ("peak MiB: torch.cuda.max_memory_allocated during one measured call, above the allocation before "
                "the case was built (so it includes weights and optimizer state)")
    return ("peak MiB: RSS high-water mark during one measured call, above the RSS before the case was built "
            "(weights and optimizer state included), each case in its own fresh spawned process")


# ----------------------------------------------------------------------------------------- output


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def mib(peak: int | None) -> str:
    return "n/a" if peak is None else f"{peak / MiB:.0f}"


def count_flops(call: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls and convolutions, forward and backward), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def matmul_call(device: torch.device, dtype: torch.dtype, size: int = 2048) -> tuple[Callable[[], Any], int]:
    """A plain size x size matmul, the reference for achievable FLOP/s: (the call to time, its FLOPs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * size**3


# --------------------------------------------------------------------------------------- markdown


class _Tee:
    """stdout that also keeps what is written."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _record_markdown(path: Path, section: str = "") -> None:
    """Tee stdout; at exit, write it as the section of this script and `section` (each keeps its own)."""
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    script = Path(sys.argv[0]).name + (f" {section}" if section else "")
    command = " ".join(["python", f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    atexit.register(lambda: write_markdown_section(path, script, command, "".join(tee.parts)))


def write_markdown_section(path: Path, script: str, command: str, report: str) -> None:
    """Put `report` as `script`'s section of the markdown file `path`, replacing that script's earlier section;
    the other scripts' sections stay."""
    start, end = f"<!-- {script} -->", f"<!-- /{script} -->"
    section = f"{start}\n## {script}\n\n`{command}`\n\n```text\n{report.strip()}\n```\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else (
        "# Benchmarks\n\nWritten by the bench scripts themselves (`--markdown`); each section is the full report "
        "of the last run of one script, with its command, versions, CPU and date. Ratios are against diffusers on "
        "identical weights, measured in the same run.\n"
    )
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    sys.__stdout__.write(f"wrote the report to {path}\n")
