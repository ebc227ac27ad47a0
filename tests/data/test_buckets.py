"""Aspect-ratio buckets: enumeration, nearest-aspect assignment, undistorted cover crops, and the
bucket batch order (one shape per batch, seeded, the same after a resume and on every process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from ldm_cli.data.buckets import BucketBatches, BucketSpec, cover_crop, enumerate_buckets, format_histogram, nearest_bucket
from ldm_cli.errors import ConfigError
from ldm_cli.training.distributed import DistInfo

SD = BucketSpec(512, 64)


def test_sd_buckets_follow_the_rules():
    buckets = enumerate_buckets(SD)
    assert buckets[:3] == [(256, 512), (320, 640), (384, 640)] and (512, 512) in buckets and (576, 448) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= min(width, height) and max(width, height) <= 1024
        assert width * height <= 512 * 512 and max(width, height) / min(width, height) <= 2.0
        # the largest for its shorter side: a step longer would break the area or the aspect limit
        short, long = sorted((width, height))
        assert short * (long + 64) > 512 * 512 or (long + 64) / short > 2.0
    assert buckets == sorted(buckets, key=lambda size: size[0] / size[1])
    assert set(buckets) == {(h, w) for w, h in buckets}  # portrait and landscape alike


def test_no_bucket_fits_is_one_line():
    with pytest.raises(ConfigError, match="no bucket fits"):
        enumerate_buckets(BucketSpec(512, 64, min_side=600, max_side=700, max_aspect=1.0))


@pytest.mark.parametrize("aspect", np.exp(np.linspace(math.log(0.5), math.log(2.0), 41)).tolist())
def test_each_image_goes_to_the_nearest_aspect_and_loses_at_most_a_sliver(aspect):
    buckets = enumerate_buckets(SD)
    size = (round(3000 * math.sqrt(aspect)), round(3000 / math.sqrt(aspect)))
    chosen = nearest_bucket(size, buckets)
    error = abs(math.log(chosen[0] / chosen[1]) - math.log(size[0] / size[1]))
    assert all(error <= abs(math.log(w / h) - math.log(size[0] / size[1])) + 1e-12 for w, h in buckets)
    # cover-resize then crop: the excess along the cropped side is within one bucket step
    scale = max(chosen[0] / size[0], chosen[1] / size[1])
    excess = max(size[0] * scale - chosen[0], size[1] * scale - chosen[1])
    assert excess <= 64 * 1.1


def test_cover_crop_scales_both_axes_alike():
    # a 300x200 image of 100x100 squares (3x2 of them), into a 64x48 bucket: squares stay square
    cells = np.kron(np.indices((2, 3)).sum(0) % 2, np.ones((100, 100))).astype(np.uint8) * 255
    image = Image.fromarray(cells).convert("RGB")
    out = cover_crop(image, (64, 48))
    assert out.size == (64, 48)
    row = np.asarray(out.convert("L"))[24] > 127
    edges = np.flatnonzero(np.diff(row.astype(int)))  # scale 0.24: squares 24 px wide, crop offset 4 of 72
    assert np.diff(edges).tolist() == [24] and edges[0] in (19, 20)


def batches_of(sampler: BucketBatches, epoch: int) -> list[list[int]]:
    return sampler.epoch(epoch)


GROUPS = [list(range(0, 10)), list(range(10, 13)), list(range(13, 30))]


def test_every_batch_is_one_bucket_and_small_buckets_are_used():
    sampler = BucketBatches(GROUPS, batch_size=4, seed=3)
    batches = sampler.epoch(0)
    assert len(batches) == len(sampler) == 3 + 1 + 5  # 10 -> 4,4,2; 3 -> 3; 17 -> 4,4,4,4,1
    group_of = {item: k for k, group in enumerate(GROUPS) for item in group}
    for batch in batches:
        assert len({group_of[item] for item in batch}) == 1
    assert sorted(item for batch in batches for item in batch) == list(range(30))  # every item once
    assert sorted(map(len, batches)) == [1, 2, 3, 4, 4, 4, 4, 4, 4]


def test_the_order_is_seeded_and_the_same_when_rebuilt():
    one, again = BucketBatches(GROUPS, 4, seed=3), BucketBatches(GROUPS, 4, seed=3)
    assert one.epoch(5) == again.epoch(5)  # a resumed run rebuilds the sampler and skips into the epoch
    assert one.epoch(5) != one.epoch(6)
    assert BucketBatches(GROUPS, 4, seed=4).epoch(5) != one.epoch(5)


def test_processes_split_each_global_batch_of_one_bucket():
    groups = [list(range(0, 12)), list(range(12, 18))]
    single = BucketBatches(groups, batch_size=4, seed=1).epoch(2)
    ranks = [BucketBatches(groups, batch_size=2, seed=1, dist=DistInfo(rank, 2)).epoch(2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for k, batch in enumerate(single):
        assert ranks[0][k] + ranks[1][k] == batch


def test_histogram_marks_buckets_smaller_than_a_batch():
    text = format_histogram([((512, 512), 10), ((384, 640), 2)], batch_size=4)
    assert text.splitlines() == ["buckets: 2", "  384x640 (0.60): 2 images (fewer than a batch of 4)", "  512x512 (1.00): 10 images"]
