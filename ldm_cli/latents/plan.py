"""Which items go into which shard, and which shards each process encodes.

Shard k of a square set holds the folder's items [k * shard_size, (k + 1) * shard_size) in
sorted-path order, so the split is the same on every run and on every process. With
`data.buckets` each image is assigned a bucket from its header size, and the shards are each
bucket's items (in folder order) in chunks of shard_size, buckets in size order.
"""

from __future__ import annotations

import math
from typing import Any

from ldm_cli.config import EncodeConfig
from ldm_cli.data.buckets import Size, assign_buckets, enumerate_buckets, spec_from_config
from ldm_cli.data.images import ImageFolderDataset, image_size
from ldm_cli.errors import ConfigError


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` encodes: every world_size-th, starting at rank."""
    return list(range(rank, num_shards, world_size))


def shard_items(number: int, shard_size: int, num_items: int) -> range:
    """The dataset items shard `number` covers."""
    return range(number * shard_size, min((number + 1) * shard_size, num_items))


def square_plan(num_items: int, shard_size: int) -> list[list[int]]:
    """The items of every shard of a set without buckets: runs of `shard_size` in folder order."""
    return [list(shard_items(number, shard_size, num_items)) for number in range(math.ceil(num_items / shard_size))]


def plan_batches(shards: list[int], shard_size: int, num_items: int, batch_size: int) -> list[list[int]]:
    """Batches of item indices, in order, none crossing a shard boundary."""
    return batches_of(square_plan(num_items, shard_size), shards, batch_size)


def batches_of(plan: list[list[int]], shards: list[int], batch_size: int) -> list[list[int]]:
    """Batches of the items of `shards` (plan[k]: the items of shard k), none crossing a shard boundary."""
    return [plan[number][start:start + batch_size] for number in shards for start in range(0, len(plan[number]), batch_size)]


def bucket_plan(buckets: list[Size], shard_size: int) -> tuple[list[list[int]], list[Size]]:
    """Shards per bucket shape: each bucket's items (in folder order) in chunks of `shard_size`,
    buckets in order of their size; returns the items and the (width, height) of every shard."""
    members: dict[Size, list[int]] = {}
    for item, bucket in enumerate(buckets):
        members.setdefault(bucket, []).append(item)
    plan, sizes = [], []
    for bucket in sorted(members):
        items = members[bucket]
        for start in range(0, len(items), shard_size):
            plan.append(items[start:start + shard_size])
            sizes.append(bucket)
    return plan, sizes


def bucket_targets(images: ImageFolderDataset, config: EncodeConfig, resolution: int, factor: int) -> tuple[list[Size], list[list[int]], list[Size], dict[str, Any]]:
    """Each image's bucket (from its header), the shards per bucket, their sizes, and the spec as recorded."""
    spec = spec_from_config(config.data, resolution)
    if spec.step % factor:
        raise ConfigError(f"data.bucket_step={spec.step} is not a multiple of the autoencoder's downsampling factor {factor}")
    targets = assign_buckets([image_size(path) for path in images.paths], enumerate_buckets(spec))
    plan, sizes = bucket_plan(targets, config.shard_size)
    low, high = spec.sides
    return targets, plan, sizes, {"step": spec.step, "min_side": low, "max_side": high, "max_aspect": spec.max_aspect}
