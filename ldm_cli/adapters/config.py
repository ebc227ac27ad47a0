"""The `lora` config group: what `ldm train-lora` adapts and how strongly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ldm_cli.errors import ConfigError

# module-name patterns (regular expressions, matched in full) of each target set, on diffusers' names
ATTENTION = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
FEED_FORWARD = r".*\.ff\.net\.(0\.proj|2)"
CONVOLUTIONS = r".*(proj_in|proj_out|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)"
TARGETS = {
    "attention": [ATTENTION],
    "attention_ff": [ATTENTION, FEED_FORWARD],
    "all": [ATTENTION, FEED_FORWARD, CONVOLUTIONS],
}
# the same sets in a CLIP text encoder (transformers' names): attention, then + the MLP, as kohya adapts
TEXT_ATTENTION = r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
TEXT_MLP = r".*mlp\.(fc1|fc2)"
TEXT_TARGETS = {
    "attention": [TEXT_ATTENTION],
    "attention_ff": [TEXT_ATTENTION, TEXT_MLP],
    "all": [TEXT_ATTENTION, TEXT_MLP],
}


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: Optional[float] = None  # None: the rank
    dropout: float = 0.0
    targets: str = "attention"
    init_from: Optional[str] = None
    # kohya's default (its --network_train_unet_only off); diffusers' --train_text_encoder
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = None  # None: train.lr (kohya's --text_encoder_lr)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def pattern(self) -> str:
        return "|".join(f"(?:{p})" for p in TARGETS[self.targets])

    @property
    def text_pattern(self) -> str:
        return "|".join(f"(?:{p})" for p in TEXT_TARGETS[self.targets])

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank: expected a positive integer, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"lora.alpha: expected null or a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: expected a number in [0, 1), got {self.dropout}")
        if self.targets not in TARGETS:
            raise ConfigError(f"lora.targets: expected one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise ConfigError(f"lora.text_encoder_lr: expected null (train.lr) or a positive number, got {self.text_encoder_lr}")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ConfigError("lora.text_encoder_lr is set but lora.train_text_encoder=false; set lora.train_text_encoder=true to adapt the text encoder")
