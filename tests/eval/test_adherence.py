"""Prompt adherence: prompt sets, Wilson intervals, and the report's rates and confusion matrices."""

import numpy as np
import pytest
from scipy.stats import binomtest

from ldm_cli.data.shapes import BACKGROUNDS, POSITIONS, SIZES, colours_for_background, draw_shape_image, parse_caption
from ldm_cli.eval.adherence import adherence_prompts, adherence_report, summary_line, wilson_interval

PAIRS = {("purple", "triangle"), ("orange", "circle")}


@pytest.mark.parametrize("successes,total", [(0, 10), (8, 10), (10, 10), (231, 256), (1, 3), (128, 128)])
def test_wilson_interval_matches_scipy(successes, total):
    reference = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(successes, total) == pytest.approx((reference.low, reference.high), abs=1e-6)


def test_held_out_prompts_ask_only_for_the_pairs_everywhere_they_can_be_drawn():
    prompts = adherence_prompts(300, seed=2, pairs=PAIRS)
    attrs = [parse_caption(prompt) for prompt in prompts]
    assert {(a["colour"], a["shape"]) for a in attrs} == PAIRS
    assert all(a["colour"] in colours_for_background(a["background"]) for a in attrs)  # no purple on gray
    assert {a["size"] for a in attrs} == set(SIZES) and {a["position"] for a in attrs} == set(POSITIONS)
    assert {a["background"] for a in attrs} == set(BACKGROUNDS)
    assert adherence_prompts(300, seed=2, pairs=PAIRS) == prompts and adherence_prompts(300, seed=3, pairs=PAIRS) != prompts


def test_report_of_true_and_swapped_captions():
    drawn = [draw_shape_image(np.random.default_rng([5, index]), 32) for index in range(60)]
    images, captions = [d[0] for d in drawn], [d[1] for d in drawn]
    perfect = adherence_report(images, captions)
    assert perfect["prompts"] == 60
    assert perfect["colour_and_shape"]["rate"] == 1.0 and perfect["colour_and_shape"]["n"] == 60
    assert perfect["colour_and_shape"]["low"] == pytest.approx(wilson_interval(60, 60)[0])
    assert sum(entry["n"] for entry in perfect["colour_and_shape_by_background"].values()) == 60
    for background, rows in perfect["colour_confusion"].items():  # diagonal only
        assert all(list(seen) == [asked] for asked, seen in rows.items())

    # every image scored against the next image's caption: the confusion matrix counts what was seen
    swapped = captions[1:] + captions[:1]
    report = adherence_report(images, swapped)
    expected = sum(parse_caption(a)["shape"] == parse_caption(b)["shape"] for a, b in zip(captions, swapped))
    assert report["shape"]["rate"] == pytest.approx(expected / 60)
    asked = parse_caption(swapped[0])
    assert report["shape_confusion"][asked["background"]][asked["shape"]][parse_caption(captions[0])["shape"]] >= 1
    line = summary_line(report)
    assert line.startswith("colour ") and line.endswith("of 60 prompts") and "both" in line


def test_report_needs_one_image_per_prompt():
    image, caption, _ = draw_shape_image(np.random.default_rng(0), 32)
    with pytest.raises(ValueError, match="one image per prompt"):
        adherence_report([image], [caption, caption])
