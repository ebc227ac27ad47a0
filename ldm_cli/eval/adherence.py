"""Prompt adherence on the shapes domain: does a sample show the shape and colour it was asked for?

Generated images are scored by the deterministic `classify_shape_image`, which reads back
every attribute of a drawn shape image; the scores are fractions of prompts whose attribute
matches.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import ATTRIBUTES, attribute_matches, caption_for, sample_attributes


def adherence_prompts(count: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [caption_for(sample_attributes(rng)) for _ in range(count)]


def score_adherence(images: list[Image.Image], prompts: list[str]) -> dict[str, float]:
    """Fraction of images matching their prompt per attribute, and colour+shape jointly."""
    matches = [attribute_matches(image, prompt) for image, prompt in zip(images, prompts)]
    scores = {name: float(np.mean([m[name] for m in matches])) for name in ATTRIBUTES}
    scores["colour_and_shape"] = float(np.mean([m["colour"] and m["shape"] for m in matches]))
    return scores
