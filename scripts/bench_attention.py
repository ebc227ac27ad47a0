"""Attention kernels on this machine: torch's fused SDPA beside the explicit softmax(q kᵀ/√d) v.

`ldm_cli.attention.attention` forms the scores explicitly on the CPU in bf16/fp16 while
query_length x key_length <= EXPLICIT_MAX_SCORES, except for the smallest forward-only calls, and
calls SDPA otherwise. This script times both kernels, forward and forward + backward, over the
attention shapes of the U-Net presets (self- and cross-attention at each level, and batch-1 sampling)
and a few larger ones, and marks the one `attention` picks, so the rule can be checked on any machine.

    python scripts/bench_attention.py                  # CPU, torch's threads
    python scripts/bench_attention.py --threads 1 --repeats 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bench  # noqa: E402

from ldm_cli.attention import attention, uses_explicit_scores  # noqa: E402

# (what, batch x heads, query length, key length, head width)
SHAPES = [
    ("tiny U-Net 4x4 self, batch 64", 256, 16, 16, 16),
    ("tiny U-Net 4x4 cross (32 tokens)", 256, 16, 32, 16),
    ("tiny U-Net 2x2 cross (32 tokens)", 256, 4, 32, 32),
    ("small U-Net 16x16 self, batch 16", 64, 256, 256, 64),
    ("small U-Net 16x16 cross (32 tokens)", 64, 256, 32, 64),
    ("small U-Net 8x8 self, batch 16", 64, 64, 64, 64),
    ("sampling small 4x4 self, CFG batch 1", 8, 16, 16, 64),
    ("sampling small 4x4 cross (77 tokens), CFG", 8, 16, 77, 64),
    ("sampling small 8x8 self, CFG batch 1", 8, 64, 64, 64),
    ("sampling small 8x8 cross (77 tokens), CFG", 8, 64, 77, 64),
    ("sampling small 4x4 self, CFG batch 4", 32, 16, 16, 64),
    ("sampling 32x32 cross (77 tokens), CFG", 16, 1024, 77, 64),
    ("sampling 64x64 self, SD1.5 level 1", 16, 4096, 4096, 40),
    ("32x32 self", 16, 1024, 1024, 64),
]


def explicit(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return scores.float().softmax(dim=-1).to(value.dtype) @ value


def make_call(kernel: Callable, shape: tuple[int, int, int, int], dtype: torch.dtype, backward: bool, device) -> Callable:
    batch_heads, query_length, key_length, width = shape
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, batch_heads, length, width, generator=generator).to(device, dtype).requires_grad_(backward)
               for length in (query_length, key_length, key_length)]
    # a dense output gradient, as the projection after attention hands back (`.sum().backward()` would pass
    # a stride-0 expanded one, which sends the explicit product's backward down a slow path)
    output_grad = torch.randn(1, batch_heads, query_length, width, generator=generator).to(device, dtype)

    def call() -> None:
        if backward:
            kernel(*tensors).backward(output_grad)
        else:
            with torch.inference_mode():
                kernel(*tensors)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--repeats", type=int, default=7, help="measured calls per case; the median is reported")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 4096-token shape (slow on a CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench.resolve_device(args.device)
    bench.print_environment(device)

    rows, wrong = [], 0
    for what, *shape in SHAPES:
        if args.skip_large and shape[1] >= 4096:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                calls = {"sdpa": make_call(F.scaled_dot_product_attention, shape, dtype, backward, device),
                         "explicit": make_call(explicit, shape, dtype, backward, device)}
                timings = bench.interleaved_timings(calls, args.repeats, 1, device)
                batch_heads, query_length, key_length, width = shape
                probes = [torch.empty(1, batch_heads, length, width, dtype=dtype, device=device, requires_grad=backward)
                          for length in (query_length, key_length, key_length)]
                chosen = "explicit" if uses_explicit_scores(*probes) else "sdpa"
                fastest = min(timings, key=lambda name: timings[name].median)
                loss = timings[chosen].median / timings[fastest].median - 1
                wrong += loss > 0.1
                rows.append([what, "x".join(map(str, shape)), str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd",
                             f"{timings['sdpa'].median * 1e3:.2f}", f"{timings['explicit'].median * 1e3:.2f}",
                             bench.ratio(timings["sdpa"].median, timings["explicit"].median), chosen,
                             "" if loss <= 0.1 else f"{100 * loss:.0f}% slower than {fastest}"])
            print(f"  {what} done", flush=True)
    print()
    bench.print_table(["shape", "BHxLqxLkxd", "dtype", "pass", "sdpa ms", "explicit ms", "sdpa/explicit", "attention()",
                       "note"], rows)
    print(f"\n'attention()' = the kernel ldm_cli.attention picks; {wrong} of {len(rows)} picks are more than 10% slower "
          "than the other kernel here")
    # the rule is checked against `attention` itself too: it must agree with the explicit kernel where it picks it
    check = [torch.randn(2, 4, 16, 16, dtype=torch.bfloat16, device=device) for _ in range(3)]
    torch.testing.assert_close(attention(*check), explicit(*check) if uses_explicit_scores(*check[:2])
                               else F.scaled_dot_product_attention(*check))


if __name__ == "__main__":
    main()
