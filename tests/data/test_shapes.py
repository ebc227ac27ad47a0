"""The built-in shapes set: determinism, caption grammar, and the attribute classifier."""

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_cli.data.images import ImageFolderDataset
from ldm_cli.data.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    MIN_CONTRAST,
    POSITIONS,
    SHAPES,
    SIZES,
    attribute_matches,
    caption_for,
    classify_shape_image,
    colours_for_background,
    draw_shape_image,
    parse_caption,
    _JITTER,
    _SIZE_JITTER,
    render_shape,
    shape_coverage,
    write_shapes_dataset,
)

CAPTION = re.compile(
    r"^a (small|large) (\w+) (\w+) in the (top left|top right|bottom left|bottom right|center) "
    r"on a (\w+) background$"
)


def test_vocabularies():
    assert len(SHAPES) >= 4 and 6 <= len(COLOURS) <= 8 and len(BACKGROUNDS) >= 2
    assert set(SIZES) == {"small", "large"} and len(POSITIONS) == 5
    for (_, a), (_, b) in itertools.combinations(COLOURS.items(), 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 90  # palette colours are far apart
    for background, rgb in BACKGROUNDS.items():
        allowed = colours_for_background(background)
        assert len(allowed) >= 5
        assert all(np.linalg.norm(np.subtract(COLOURS[c], rgb)) >= MIN_CONTRAST for c in allowed)


def test_drawing_is_deterministic_per_seed():
    first = [draw_shape_image(np.random.default_rng([0, i]), 32) for i in range(5)]
    again = [draw_shape_image(np.random.default_rng([0, i]), 32) for i in range(5)]
    other = [draw_shape_image(np.random.default_rng([1, i]), 32) for i in range(5)]
    for (image_a, caption_a, attrs_a), (image_b, caption_b, attrs_b) in zip(first, again):
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
        assert caption_a == caption_b and attrs_a == attrs_b
    assert any(not np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(first, other))


def test_caption_grammar_and_round_trip():
    image, caption, attrs = draw_shape_image(np.random.default_rng(3), 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert CAPTION.match(caption), caption
    assert caption == caption_for(attrs) and parse_caption(caption) == attrs
    assert caption_for({"size": "small", "colour": "red", "shape": "circle", "position": "top left",
                        "background": "white"}) == "a small red circle in the top left on a white background"
    for values in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS):
        attrs = dict(zip(("size", "colour", "shape", "position", "background"), values))
        assert parse_caption(caption_for(attrs)) == attrs
    assert parse_caption("  A Large blue cross in the center on a  black background ")["shape"] == "cross"
    with pytest.raises(ValueError):
        parse_caption("a large blue hexagon in the center on a black background")


def test_every_attribute_value_occurs_and_contrast_holds():
    seen = {name: set() for name in ATTRIBUTES}
    for index in range(400):
        _, _, attrs = draw_shape_image(np.random.default_rng([0, index]), 16)
        for name in ATTRIBUTES:
            seen[name].add(attrs[name])
        assert attrs["colour"] in colours_for_background(attrs["background"])
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS)
    assert seen["size"] == set(SIZES) and seen["position"] == set(POSITIONS)
    assert seen["background"] == set(BACKGROUNDS)


def test_drawing_is_antialiased():
    attrs = {"size": "large", "colour": "red", "shape": "circle", "position": "top left", "background": "black"}
    pixels = np.asarray(render_shape(attrs, 32)).astype(int)
    assert len(np.unique(pixels[..., 0])) > 5  # soft edge values between 0 and 220, not a hard mask
    assert (pixels[..., 1:] <= 40).all()  # blends stay between red and black


def test_jittered_large_shapes_stay_inside_the_image():
    # the most extreme box draw_shape_image can produce: large, scaled up, pushed to a corner
    side = SIZES["large"] * (1 + _SIZE_JITTER)
    for center in [(0.25 - _JITTER,) * 2, (0.75 + _JITTER,) * 2]:
        coverage = shape_coverage("square", 64, center, side)
        assert coverage.sum() == pytest.approx((side * 64) ** 2, rel=0.01)  # nothing clipped


def test_write_shapes_dataset(tmp_path):
    root = write_shapes_dataset(tmp_path / "shapes", n=12, size=32, seed=4)
    names = sorted(path.name for path in root.iterdir())
    assert names == [f"{i:05d}.png" for i in range(12)] + ["metadata.jsonl"]  # no sidecars
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in rows] == names[:-1]
    for index, row in enumerate(rows):
        image, caption, _ = draw_shape_image(np.random.default_rng([4, index]), 32)
        assert row["text"] == caption
        assert np.array_equal(np.asarray(Image.open(root / row["file_name"])), np.asarray(image))
    dataset = ImageFolderDataset(root, resolution=32, split="all")
    assert dataset.captions == [row["text"] for row in rows]
    # pixels survive the loader unchanged (no resize at the native resolution)
    expected = np.asarray(Image.open(root / "00000.png")).astype(np.float32) / 127.5 - 1
    assert np.allclose(dataset[0]["image"].permute(1, 2, 0).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("size", [32, 64])
def test_classifier_recovers_drawn_attributes(size):
    errors = {name: 0 for name in ATTRIBUTES}
    n_images = 200
    for index in range(n_images):
        image, caption, attrs = draw_shape_image(np.random.default_rng([11, size, index]), size)
        seen = classify_shape_image(image)
        for name in ATTRIBUTES:
            errors[name] += seen[name] != attrs[name]
    accuracy = {name: 1 - count / n_images for name, count in errors.items()}
    assert all(value > 0.95 for value in accuracy.values()), accuracy


def test_classifier_tolerates_noise_and_reports_empty_images():
    rng = np.random.default_rng(0)
    correct = 0
    for index in range(50):
        image, caption, _ = draw_shape_image(np.random.default_rng([12, index]), 32)
        noisy = np.clip(np.asarray(image) + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
        correct += all(attribute_matches(noisy, caption).values())
    assert correct >= 45
    blank = classify_shape_image(Image.new("RGB", (32, 32), (0, 0, 0)))
    assert blank == {"size": None, "colour": None, "shape": None, "position": None, "background": "black"}
    matches = attribute_matches(Image.new("RGB", (32, 32), (0, 0, 0)),
                                "a small red circle in the center on a black background")
    assert matches == {"size": False, "colour": False, "shape": False, "position": False, "background": True}


@pytest.mark.parametrize("radius", [0.75, 1.0])
def test_classifier_reads_softened_shapes_as_drawn(radius):
    # a decoder's output is softer than the drawn images: blurred, a small cross must still read as a
    # cross and a small diamond as a diamond (each shape scored apart, so none passes by the others)
    correct, total = {}, {}
    for index in range(500):
        image, _, attrs = draw_shape_image(np.random.default_rng([13, index]), 32)
        seen = classify_shape_image(image.filter(ImageFilter.GaussianBlur(radius)))
        key = (attrs["size"], attrs["shape"])
        correct[key] = correct.get(key, 0) + (seen["shape"] == attrs["shape"])
        total[key] = total.get(key, 0) + 1
    assert len(total) == 10 and min(total.values()) >= 30
    accuracy = {key: correct[key] / total[key] for key in total}
    assert all(value >= 0.9 for value in accuracy.values()), accuracy
    assert sum(correct.values()) / sum(total.values()) >= 0.98, accuracy


def test_classifier_scores_the_datasets_own_images_per_colour_and_background():
    # the adherence scorer is only as honest as its accuracy on real data: every colour and every
    # background of the quickstart's 32 px images, drawn exactly as write_shapes_dataset draws them
    correct, total = {}, {}
    for index in range(1400):
        image, _, attrs = draw_shape_image(np.random.default_rng([0, index]), 32)
        right = classify_shape_image(image) == attrs
        for key in (("colour", attrs["colour"]), ("background", attrs["background"])):
            correct[key] = correct.get(key, 0) + right
            total[key] = total.get(key, 0) + 1
    assert set(total) == {("colour", c) for c in COLOURS} | {("background", b) for b in BACKGROUNDS}
    accuracy = {key: correct[key] / total[key] for key in total}
    assert min(total.values()) >= 50
    assert all(value >= 0.99 for value in accuracy.values()), accuracy
