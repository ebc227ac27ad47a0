"""The imported model's text encoder, in one of two forms:

bundled     a complete transformers folder (config, weights, tokenizer) assembled in scratch, checked
            and loaded — from a CLIP tower inside an SD file, a diffusers text_encoder/, or a local folder
referenced a hub id, when the source has no encoder (`ldm sample` loads it from the Hugging Face cache)
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from ldm_cli.diffusion.text import TextEncoderConfig, load_text_encoder
from ldm_cli.errors import BundleError, IncompatibleError, MissingWeightsError, UsageError
from ldm_cli.interop.checks import check_weights
from ldm_cli.interop.configs import read_json
from ldm_cli.interop.detect import block_indices
from ldm_cli.interop.imported import SD1_TEXT_ENCODER, SD1_TEXT_WIDTH, ImportedText, Log
from ldm_cli.interop.sd_keys import text_sd_to_transformers, text_transformers_to_sd
from ldm_cli.interop.single_file import StateDict, find_weights, read_folder_weights
from ldm_cli.interop.tokenizer import find_tokenizer

CLIP_HEAD_CHANNELS = 64  # every CLIP text tower SD uses has 64 channels per attention head


def text_from_sd_checkpoint(
    sd_weights: StateDict, hint: Optional[dict], option: Optional[str], scratch: Path, source: Path
) -> ImportedText:
    """An SD file's CLIP tower (cond_stage_model.transformer.*, prefix removed), bundled with a tokenizer
    found elsewhere; its config from ldm's metadata (`hint`) or read off the weights."""
    weights = text_sd_to_transformers(sd_weights)
    width = int(_clip_body(weights)["embeddings.token_embedding.weight"].shape[1])
    tokenizer, tokenizer_origin = find_tokenizer(option, None, width, source)
    config = clip_config(weights, tokenizer, hint)
    origin = f"{source.name} (CLIP weights), tokenizer from {tokenizer_origin}"
    return _bundle_clip(weights, config, tokenizer, scratch / "text_encoder", origin)


def text_from_diffusers_folder(folder: Path, option: Optional[str], scratch: Path) -> ImportedText:
    """A pipeline folder's text_encoder/, with its tokenizer/ (or the one --text-encoder names)."""
    model_dir = folder / "text_encoder"
    raw = read_json(model_dir / "config.json")
    tokenizer, tokenizer_origin = find_tokenizer(option, folder / "tokenizer", None, folder)
    if raw.get("model_type") == "clip_text_model":
        from transformers import CLIPTextConfig

        # through the SD map and back: one CLIP layout whatever transformers wrote it, unknown keys refused
        weights = text_sd_to_transformers(text_transformers_to_sd(read_folder_weights(model_dir, "model")))
        config = CLIPTextConfig.from_pretrained(str(model_dir))
        origin = f"{model_dir}, tokenizer from {tokenizer_origin}"
        return _bundle_clip(weights, config, tokenizer, scratch / "text_encoder", origin)
    # another encoder family (BERT, T5, ...): transformers reads its own folder, we only add the tokenizer
    target = scratch / "text_encoder"
    shutil.copytree(model_dir, target)
    tokenizer.save_pretrained(target)
    return _load_text_folder(target, f"{model_dir} ({raw.get('model_type')}), tokenizer from {tokenizer_origin}")


def referenced_text(option: Optional[str], context_dim: int, scratch: Path, log: Log) -> ImportedText:
    """The source has no text encoder: a local folder given by --text-encoder (bundled), else a hub id (named)."""
    if option is None:
        if context_dim != SD1_TEXT_WIDTH:
            raise UsageError(
                f"the source has no text encoder and its U-Net reads {context_dim}-wide text embeddings; "
                "name one with --text-encoder (a hub id or a local folder)"
            )
        option = SD1_TEXT_ENCODER
    path = Path(option).expanduser()
    if not path.is_dir():
        log(f"text encoder: {option} (named, not bundled: `ldm sample` loads it from the Hugging Face cache)")
        return ImportedText(TextEncoderConfig(pretrained=option), None, option)
    if (path / "text_encoder").is_dir():  # a diffusers pipeline folder: its encoder and tokenizer, as one folder
        folder = scratch / "text_encoder"
        shutil.copytree(path / "text_encoder", folder)
        for file in (path / "tokenizer").glob("*") if (path / "tokenizer").is_dir() else []:
            shutil.copy2(file, folder / file.name)
        path = folder
    return _load_text_folder(path, option)


def clip_config(weights: Mapping[str, torch.Tensor], tokenizer: Any, hint: Optional[dict]) -> Any:
    """A CLIPTextConfig read off the weights; what weights cannot tell is SD v1's (OpenAI CLIP) choice."""
    from transformers import CLIPTextConfig

    if hint:
        return CLIPTextConfig.from_dict(hint)
    body = _clip_body(weights)
    fc1 = body.get("encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise BundleError("CLIP text encoder weights have no encoder.layers.0.mlp.fc1 — is the file complete?")
    vocab_size, width = body["embeddings.token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(width),
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=len(block_indices(body, "encoder.layers.")),
        num_attention_heads=max(1, int(width) // CLIP_HEAD_CHANNELS),
        max_position_embeddings=int(body["embeddings.position_embedding.weight"].shape[0]),
        hidden_act="quick_gelu",  # OpenAI CLIP (SD v1); OpenCLIP towers use gelu but come in another layout
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_body(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP weights without transformers' `text_model.` prefix (which its versions add or not)."""
    return {k.removeprefix("text_model."): v for k, v in weights.items()}


def _bundle_clip(weights: StateDict, config: Any, tokenizer: Any, folder: Path, origin: str) -> ImportedText:
    """Write a complete HF folder (config, weights, tokenizer), check it, and load it to be bundled."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    check_weights(weights, lambda: CLIPTextModel(config), "CLIP text encoder")
    if len(tokenizer) > config.vocab_size:
        raise IncompatibleError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder embeds only {config.vocab_size}; "
            "pass its own tokenizer with --text-encoder"
        )
    folder.mkdir(parents=True)
    config.architectures = ["CLIPTextModel"]
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    # tokenizers read from raw files say model_max_length=1e30: cap it at what the encoder embeds
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else config.max_position_embeddings
    tokenizer.model_max_length = min(limit, config.max_position_embeddings)
    tokenizer.save_pretrained(folder)
    return _load_text_folder(folder, origin, dtype=next(iter(weights.values())).dtype)


def _load_text_folder(folder: Path, origin: str, dtype: torch.dtype | None = None) -> ImportedText:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    positions = getattr(hf_config, "max_position_embeddings", 77)
    config = TextEncoderConfig(pretrained=str(folder), max_length=min(77, positions))
    encoder = load_text_encoder(config, dtype=dtype or _stored_dtype(folder))
    parameters = sum(p.numel() for p in encoder.model.parameters())
    return ImportedText(config, encoder, origin, parameters)


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype of a text encoder's safetensors weights (read from the header), so bundling keeps it."""
    from safetensors import safe_open

    try:
        first = find_weights(folder, "model")[0]
    except MissingWeightsError:
        return torch.float32  # e.g. pytorch_model.bin: transformers reads it, in float32
    if first.suffix != ".safetensors":
        return torch.float32
    with safe_open(str(first), framework="pt") as handle:
        keys = list(handle.keys())
        return handle.get_tensor(keys[0]).dtype if keys else torch.float32
