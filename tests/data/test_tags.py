"""Tag captions: keep_tokens stay first, the rest are shuffled and dropped per draw."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ldm_cli.data.tags import augment_tags

CAPTION = "photo of sam, portrait, outdoors, bokeh, film grain, smiling"
TAGS = ["photo of sam", "portrait", "outdoors", "bokeh", "film grain", "smiling"]


def test_keep_tokens_stay_in_place_and_the_rest_is_a_permutation():
    orders = set()
    for seed in range(50):
        tags = augment_tags(CAPTION, np.random.default_rng(seed), shuffle=True, keep_tokens=2).split(", ")
        assert tags[:2] == TAGS[:2] and sorted(tags[2:]) == sorted(TAGS[2:])
        orders.add(tuple(tags[2:]))
    assert len(orders) > 10  # 4! = 24 orders, most of them drawn


def test_the_same_generator_state_gives_the_same_caption():
    first = augment_tags(CAPTION, np.random.default_rng([0, 7, 0, 3]), shuffle=True, keep_tokens=1, dropout=0.3)
    again = augment_tags(CAPTION, np.random.default_rng([0, 7, 0, 3]), shuffle=True, keep_tokens=1, dropout=0.3)
    assert first == again


def test_tag_dropout_drops_each_free_tag_at_its_rate_and_never_a_kept_one():
    kept = Counter()
    for seed in range(2000):
        tags = augment_tags(CAPTION, np.random.default_rng(seed), shuffle=False, keep_tokens=1, dropout=0.25).split(", ")
        assert tags[0] == TAGS[0]
        assert tags[1:] == [tag for tag in TAGS[1:] if tag in tags[1:]]  # no shuffle: order kept
        kept.update(tags[1:])
    for tag in TAGS[1:]:
        assert abs(kept[tag] / 2000 - 0.75) < 0.04


def test_plain_captions_pass_through():
    assert augment_tags("a red circle", np.random.default_rng(0), shuffle=True) == "a red circle"
    assert augment_tags(" a ,b,, c ", np.random.default_rng(0), shuffle=False) == "a, b, c"
