"""Aspect-ratio buckets (kohya sd-scripts' scheme): photos keep their shape instead of a square crop.

For a target area `resolution²`, the buckets are the width × height pairs whose sides are multiples
of `bucket_step`, lie in [min_side, max_side], have an aspect ratio of at most `max_aspect`, and
are, for their width (or height), the largest that fits in the area and the aspect limit. Each image goes to the bucket
nearest its aspect ratio in log space, is resized to cover it (aspect kept) and centre-cropped, so
it loses at most a sliver along one side.

Training draws each batch from one bucket (`BucketBatches`). A bucket's leftover items that do not
fill a batch form one smaller batch (rounded down to a multiple of the number of processes), so
no bucket is ever unused; a bucket with fewer items than processes sits an epoch out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image

from ldm_cli.errors import ConfigError, DataError
from ldm_cli.training.distributed import DistInfo

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketSpec:
    resolution: int
    step: int = 64
    min_side: Optional[int] = None  # default resolution / 2
    max_side: Optional[int] = None  # default resolution * 2
    max_aspect: float = 2.0

    @property
    def sides(self) -> tuple[int, int]:
        low = self.min_side if self.min_side is not None else self.resolution // 2
        high = self.max_side if self.max_side is not None else self.resolution * 2
        return low, high


def enumerate_buckets(spec: BucketSpec) -> list[Size]:
    """Every bucket of `spec`, sorted by aspect ratio (portrait first)."""
    low, high = spec.sides
    if spec.step < 1 or low < 1 or high < low:
        raise ConfigError(f"bucket sides must satisfy 1 <= min_side <= max_side and step >= 1, got {spec}")
    area, step = spec.resolution**2, spec.step
    first = math.ceil(low / step) * step
    buckets = set()
    for side in range(first, high + 1, step):
        # the longest other side within the area and the aspect limit
        other = min(high, (area // side) // step * step, math.floor(side * spec.max_aspect / step + 1e-9) * step)
        if other >= low and max(side, other) / min(side, other) <= spec.max_aspect + 1e-9:
            buckets.update({(side, other), (other, side)})
    if not buckets:
        raise ConfigError(
            f"no bucket fits data.resolution={spec.resolution}, data.bucket_step={step}, sides in [{low}, {high}], "
            f"data.max_aspect={spec.max_aspect}; widen data.min_side/max_side or max_aspect"
        )
    return sorted(buckets, key=lambda size: (size[0] / size[1], size[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest `size`'s in log space (ties: the larger area)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - aspect), -bucket[0] * bucket[1]))


def cover_crop(image: Image.Image, size: Size) -> Image.Image:
    """Resize (bicubic, antialiased, aspect kept) so the image covers `size`, then centre-crop to it."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def histogram(sizes: Sequence[Size]) -> list[tuple[Size, int]]:
    """(bucket, count) pairs, most common first (ties: the squarest first)."""
    return sorted(Counter(sizes).items(), key=lambda entry: (-entry[1], abs(math.log(entry[0][0] / entry[0][1])), entry[0]))


def format_histogram(counts: Sequence[tuple[Size, int]], batch_size: Optional[int] = None) -> str:
    """One line per bucket: `  512x768 (0.67): 12 images`."""
    lines = [f"buckets: {len(counts)}"]
    for (width, height), count in sorted(counts, key=lambda entry: entry[0][0] / entry[0][1]):
        note = f" (fewer than a batch of {batch_size})" if batch_size and count < batch_size else ""
        lines.append(f"  {width}x{height} ({width / height:.2f}): {count} image{'s' if count != 1 else ''}{note}")
    return "\n".join(lines)


class BucketBatches:
    """Seeded batches that never mix buckets: the same on every process, exact under resume.

    Epoch `e` shuffles each bucket's items and then the order of all batches with the seed `seed + e`
    (the list depends on nothing else); each global batch is split between the processes.
    """

    def __init__(self, groups: Sequence[Sequence[int]], batch_size: int, seed: int, dist: DistInfo = DistInfo()) -> None:
        self.groups = [list(group) for group in groups if len(group)]
        self.batch_size, self.seed, self.dist = batch_size, seed, dist
        world = dist.world_size
        self.sizes: list[list[int]] = []  # per group: the local batch sizes of its batches
        for group in self.groups:
            full, rest = divmod(len(group), batch_size * world)
            self.sizes.append([batch_size] * full + ([rest // world] if rest >= world else []))
        if not any(self.sizes):
            raise DataError(f"the dataset has {sum(map(len, self.groups))} items, fewer than the {world} processes")

    def __len__(self) -> int:
        return sum(len(sizes) for sizes in self.sizes)

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`, as lists of item indices."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        world, rank = self.dist.world_size, self.dist.rank
        batches = []
        for group, sizes in zip(self.groups, self.sizes):
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            start = 0
            for local in sizes:
                global_batch = order[start:start + local * world]
                batches.append(global_batch[rank * local:(rank + 1) * local])
                start += local * world
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]


def spec_from_config(data, resolution: int) -> BucketSpec:
    """The BucketSpec of a DataConfig at `resolution` (the encode resolution)."""
    return BucketSpec(resolution, data.bucket_step, data.min_side, data.max_side, data.max_aspect)


def assign_buckets(sizes: Sequence[Optional[Size]], buckets: Sequence[Size]) -> list[Size]:
    """Each image's bucket; an unreadable image (None) gets the squarest one (it is skipped when read)."""
    return [nearest_bucket(size or (1, 1), buckets) for size in sizes]
