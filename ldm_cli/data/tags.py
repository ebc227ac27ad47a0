"""Comma-separated tag captions ("photo of a cat, outdoors, bokeh"): per-step shuffling and dropout
as in kohya sd-scripts, so the model does not learn the tag order."""

from __future__ import annotations

import numpy as np


def augment_tags(caption: str, rng: np.random.Generator, shuffle: bool, keep_tokens: int = 0, dropout: float = 0.0) -> str:
    """The first `keep_tokens` tags stay in place; each other tag is dropped with probability
    `dropout`, and the rest are shuffled when `shuffle`. Joined with ", "."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if dropout > 0:
        rest = [tag for tag, draw in zip(rest, rng.random(len(rest))) if draw >= dropout]
    if shuffle:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(kept + rest)
