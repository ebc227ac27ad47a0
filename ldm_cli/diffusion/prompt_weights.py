"""AUTOMATIC1111's prompt-weighting syntax: text → (fragment, weight) pairs, and those → 75-token chunks.

`(word)` ×1.1, `((word))` ×1.21, `[word]` ÷1.1, `(word:1.5)` ×1.5, `\\(` `\\)` `\\[` `\\]` literal brackets,
and `BREAK` (upper case, a word of its own) starts a new chunk. Unclosed brackets weigh to the end of the
prompt, as in A1111's `parse_prompt_attention`, which this follows rule for rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes
\(|\[|                        # openers
:\s*([+-]?[.\d]+)\s*\)|       # (text:weight)
\)|]|                         # closers
[^\\()\[\]:]+|                # plain text
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """(fragment, weight) pairs in order, runs of equal weight merged; a BREAK is the pair (BREAK, -1)."""
    pieces: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(pieces))
        elif token == "[":
            square_brackets.append(len(pieces))
        elif weight is not None and round_brackets:
            try:
                multiply_from(round_brackets.pop(), float(weight))
            except ValueError:  # "(a:1.2.3)": not a number, kept as text like A1111's ':' fallback
                pieces.append([token, 1.0])
        elif token == ")" and round_brackets:
            multiply_from(round_brackets.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_from(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in round_brackets:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_brackets:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


@dataclass
class Chunk:
    """One window of the text encoder: ids and per-token weights, both of length chunk_length + 2."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_tokens(
    fragments: Sequence[tuple[str, float]],
    tokenize: Callable[[str], list[int]],
    chunk_length: int,
    bos: int,
    eos: int,
    pad: int,
) -> list[Chunk]:
    """Split weighted fragments into chunks of `chunk_length` tokens, each wrapped as BOS … EOS and padded.

    A BREAK closes the current chunk; a prompt with no tokens is one chunk of BOS, EOS and padding.
    """
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        padding = chunk_length - len(ids)
        chunks.append(Chunk([bos, *ids, eos] + [pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding))
        ids.clear()
        weights.clear()

    for text, weight in fragments:
        if text == BREAK and weight == -1:
            close()
            continue
        for token in tokenize(text):
            if len(ids) == chunk_length:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks
