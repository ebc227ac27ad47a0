"""The tokenizer for an imported text encoder: SD checkpoints carry the encoder's weights but not
its tokenizer. Found offline only — a local folder or the Hugging Face cache, never a download."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ldm_cli.errors import MissingWeightsError
from ldm_cli.interop.imported import SD1_TEXT_ENCODER, SD1_TEXT_WIDTH


def find_tokenizer(
    option: Optional[str], folder_tokenizer: Optional[Path], clip_width: Optional[int], source: Path
) -> tuple[Any, str]:
    """(tokenizer, where it came from): --text-encoder, else the source's own tokenizer/, else
    SD v1's CLIP tokenizer from the Hugging Face cache."""
    if option is not None:
        candidates = _folder_candidates(option, "tokenizer")
    elif folder_tokenizer is not None:
        candidates = [str(folder_tokenizer)]
    elif clip_width == SD1_TEXT_WIDTH:
        candidates = [SD1_TEXT_ENCODER]
    else:
        candidates = []
    for candidate in candidates:
        tokenizer = _load_tokenizer(candidate)
        if tokenizer is not None:
            return tokenizer, candidate
    wanted = option or (str(folder_tokenizer) if folder_tokenizer else SD1_TEXT_ENCODER)
    raise MissingWeightsError(
        f"{source} holds the text encoder's weights but its tokenizer ({wanted}) is not on this machine; pass "
        f"--text-encoder <folder with the tokenizer files, or a diffusers folder>, e.g. from "
        f"`huggingface-cli download {SD1_TEXT_ENCODER} --include '*.json' '*.txt' --local-dir clip-vit-large-patch14`"
    )


def _folder_candidates(option: str, subfolder: str) -> list[str]:
    path = Path(option).expanduser()
    if path.is_dir():
        return [str(path / subfolder), str(path)] if (path / subfolder).is_dir() else [str(path)]
    return [option]  # a hub id: the Hugging Face cache


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None
