"""Prompt adherence on the shapes domain: does a sample show what its prompt asks for?

Generated images are scored by the deterministic `classify_shape_image`, which reads back
every attribute of a drawn shape image. Each rate comes with its Wilson 95% interval (a
rate from a few hundred prompts is only known to a few points), and the report breaks the
rates down by background, size and position, with per-background confusion matrices of
colour and shape: they show where a model fails, not only how often.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Collection, Iterable, Optional

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    POSITIONS,
    SIZES,
    caption_for,
    classify_shape_image,
    colours_for_background,
    parse_caption,
    sample_attributes,
)

Pair = tuple[str, str]  # (colour, shape)
JOINT = "colour_and_shape"
RATES = (*ATTRIBUTES, JOINT)


def adherence_prompts(count: int, seed: int = 1, pairs: Optional[Collection[Pair]] = None) -> list[str]:
    """`count` random captions; with `pairs`, every caption asks for one of these (colour, shape) pairs
    on a background it can be drawn on, at a random size and position."""
    rng = np.random.default_rng(seed)
    if pairs is None:
        return [caption_for(sample_attributes(rng)) for _ in range(count)]
    pairs = sorted(pairs)
    prompts = []
    for _ in range(count):
        colour, shape = pairs[rng.integers(len(pairs))]
        backgrounds = [name for name in BACKGROUNDS if colour in colours_for_background(name)]
        prompts.append(caption_for({
            "size": str(rng.choice(list(SIZES))),
            "colour": colour,
            "shape": shape,
            "position": str(rng.choice(list(POSITIONS))),
            "background": str(rng.choice(backgrounds)),
        }))
    return prompts


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95% by default); unlike rate ± z·se it stays in
    [0, 1] and is honest near 0% and 100%."""
    if total <= 0:
        return (0.0, 1.0)
    rate = successes / total
    centre = (rate + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total))
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_with_interval(hits: Iterable[bool]) -> dict:
    """{"rate", "low", "high", "n"}: a fraction and its Wilson 95% interval."""
    hits = [bool(hit) for hit in hits]
    low, high = wilson_interval(sum(hits), len(hits))
    return {"rate": sum(hits) / len(hits) if hits else 0.0, "low": low, "high": high, "n": len(hits)}


def _matches(wanted: dict[str, str], seen: dict[str, Optional[str]]) -> dict[str, bool]:
    found = {name: seen[name] == wanted[name] for name in ATTRIBUTES}
    found[JOINT] = found["colour"] and found["shape"]
    return found


def score_adherence(images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
    """Fraction of images matching their prompt per attribute, and colour+shape jointly."""
    matches = [_matches(parse_caption(prompt), classify_shape_image(image)) for image, prompt in zip(images, prompts)]
    return {name: float(np.mean([m[name] for m in matches])) for name in RATES}


def adherence_report(images: list[Image.Image], prompts: list[str]) -> dict:
    """Every rate with its interval, the joint rate per background / size / position, and the colour and
    shape confusion matrices per background ({background: {asked: {seen: count}}}; None: nothing seen)."""
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one image per prompt, got {len(images)} images for {len(prompts)} prompts")
    wanted = [parse_caption(prompt) for prompt in prompts]
    seen = [classify_shape_image(image) for image in images]
    matches = [_matches(w, s) for w, s in zip(wanted, seen)]
    report: dict = {"prompts": len(prompts)}
    report.update({name: rate_with_interval(m[name] for m in matches) for name in RATES})
    for attribute, values in (("background", BACKGROUNDS), ("size", SIZES), ("position", POSITIONS)):
        report[f"{JOINT}_by_{attribute}"] = {
            value: rate_with_interval(m[JOINT] for w, m in zip(wanted, matches) if w[attribute] == value)
            for value in values if any(w[attribute] == value for w in wanted)
        }
    for attribute in ("colour", "shape"):
        counts = Counter((w["background"], w[attribute], str(s[attribute])) for w, s in zip(wanted, seen))
        confusion: dict = {}
        for (background, asked, got), count in sorted(counts.items()):
            confusion.setdefault(background, {}).setdefault(asked, {})[got] = count
        report[f"{attribute}_confusion"] = confusion
    return report


def summary_line(report: dict, noun: str = "prompts") -> str:
    """'colour 96% (94%–98%), shape …, both 91% (87%–94%) of 256 prompts'."""
    def one(name: str, label: str) -> str:
        entry = report[name]
        return f"{label} {entry['rate']:.0%} ({entry['low']:.0%}–{entry['high']:.0%})"

    return f"{one('colour', 'colour')}, {one('shape', 'shape')}, {one(JOINT, 'both')} of {report['prompts']} {noun}"
