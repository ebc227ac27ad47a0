"""Packed weights per layer of a U-Net, on this CPU: each Linear and Conv2d shape as sampling runs it
(classifier-free guidance batch 2), called on plain weights and on oneDNN-packed ones, and the
one-time reorder that packing costs.

`ldm_cli.backends.cpu` packs convolutions and leaves fp32 matmuls on MKL's GEMM; the per-kind totals
at the end show whether that rule holds on this machine.

    python scripts/bench_packing.py                      # SD-1.5 shapes at 512 px, torch's threads
    python scripts/bench_packing.py --resolution 768 --threads 2 --markdown
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from ldm_cli.backends.cpu import TokenConv1x1, optimize_for_cpu, prepack_available  # noqa: E402
from ldm_cli.diffusion.unet import UNet  # noqa: E402
from ldm_cli.diffusion.unet_config import UNetConfig  # noqa: E402


def fastest(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_calls(unet: UNet, latent: int, context: int) -> tuple[collections.Counter, dict[tuple, nn.Module]]:
    """(layer, weight shape, input shape) -> calls in one guided step, and -> the layer; recorded with forward hooks."""
    calls: collections.Counter = collections.Counter()
    layers = {}

    def record(module: nn.Module, inputs: tuple, _output: object) -> None:
        key = (type(module).__name__, tuple(module.weight.shape), tuple(inputs[0].shape))
        calls[key] += 1
        layers[key] = module

    hooks = [m.register_forward_hook(record) for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    x = torch.randn(2, unet.config.in_channels, latent, latent).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        unet(x, torch.tensor([500, 500]), torch.randn(2, 77, context))
    for hook in hooks:
        hook.remove()
    return calls, layers


def time_layer(module: nn.Module, input_shape: tuple, repeats: int) -> tuple[float, float, float]:
    """(plain, packed, reorder) seconds for one call."""
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if type(module) is nn.Conv2d:
        x = torch.randn(input_shape).contiguous(memory_format=torch.channels_last)
        options = (list(module.padding), list(module.stride), list(module.dilation), module.groups)
        plain_weight = weight.contiguous(memory_format=torch.channels_last)
        reorder = lambda: torch.ops.mkldnn._reorder_convolution_weight(weight, *options, list(input_shape))  # noqa: E731
        packed = reorder()
        return (fastest(lambda: F.conv2d(x, plain_weight, bias, module.stride, module.padding, module.dilation, module.groups), repeats),
                fastest(lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *options, "none", [], ""), repeats),
                fastest(reorder, 2))
    matrix = weight.flatten(1)
    rows = int(torch.Size(input_shape).numel()) // matrix.shape[1]
    x = torch.randn(rows, matrix.shape[1])
    reorder = lambda: torch.ops.mkldnn._reorder_linear_weight(matrix, rows)  # noqa: E731
    packed = reorder()
    return (fastest(lambda: F.linear(x, matrix, bias), repeats),
            fastest(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""), repeats),
            fastest(reorder, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--preset", default="sd15", help="U-Net config under configs/unet (default sd15)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels; latents are 1/8 of it")
    parser.add_argument("--repeats", type=int, default=3, help="calls per case; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", nargs="?", const=str(bench.DOCS), default=None, metavar="FILE")
    args = parser.parse_args()
    args.device, args.seed = "cpu", 0
    if not prepack_available():
        raise SystemExit("this torch build has no oneDNN packed-weight ops")
    bench.setup(args, section=f"--preset {args.preset} --resolution {args.resolution}")
    config = bench.load_yaml("unet", args.preset, UNetConfig)
    unet = optimize_for_cpu(UNet(config).eval())
    calls, layers = layer_calls(unet, args.resolution // 8, config.cross_attention_dim)

    rows, totals = [], collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for key, count in sorted(calls.items(), key=lambda item: -item[1] * torch.Size(item[0][1]).numel()):
        kind, weight_shape, input_shape = key
        kind = "Linear" if kind == TokenConv1x1.__name__ else kind  # it runs as a matmul on the tokens
        plain, packed, reorder = time_layer(layers[key], input_shape, args.repeats)
        for index, value in enumerate((count * plain, count * packed, reorder)):
            totals[kind][index] += value
        rows.append([kind, "x".join(map(str, weight_shape)), "x".join(map(str, input_shape)), count,
                     f"{plain * 1e3:.2f}", f"{packed * 1e3:.2f}", bench.ratio(packed, plain), f"{reorder * 1e3:.1f}"])
    print()
    bench.print_table(["layer", "weight", "input", "calls/step", "plain ms", "packed ms", "packed/plain", "reorder ms"], rows)
    print()
    bench.print_table(["kind", "plain s/step", "packed s/step", "packed/plain", "reorder s (once)"],
                      [[kind, f"{plain:.2f}", f"{packed:.2f}", bench.ratio(packed, plain), f"{reorder:.2f}"]
                       for kind, (plain, packed, reorder) in sorted(totals.items())])


if __name__ == "__main__":
    main()
