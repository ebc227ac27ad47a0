"""The U-Net's shape (`UNetConfig`): field names and meanings are diffusers' `UNet2DConditionModel` config,
so a diffusers `config.json` reads one-to-one; `validate` names the first inconsistent field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ldm_cli.errors import ConfigError

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)


@dataclass
class UNetConfig:
    """Shape of the U-Net; field names and meanings are diffusers' `UNet2DConditionModel` config."""

    sample_size: int = 64  # latent side length the model is trained at (informational)
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    )
    # The next three are `int` or `list[int]` (one per down block), as in diffusers;
    # typed Any because OmegaConf cannot express that union.
    layers_per_block: Any = 2
    transformer_layers_per_block: Any = 1
    # diffusers' historical misnomer: this is the NUMBER OF HEADS (head width = channels // heads).
    attention_head_dim: Any = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # SD1: 1x1 conv proj_in/proj_out; SD2: Linear
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    gradient_checkpointing: bool = False  # recompute resnets/transformers in backward to save memory

    def __post_init__(self) -> None:
        # configs composed by OmegaConf hand in ListConfig; keep plain python values
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        self.down_block_types = [str(t) for t in self.down_block_types]
        self.up_block_types = [str(t) for t in self.up_block_types]
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("unet.block_out_channels is empty; give one width per resolution level")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"unet: block_out_channels ({n}), down_block_types ({len(self.down_block_types)}) and "
                f"up_block_types ({len(self.up_block_types)}) must have the same length"
            )
        for kind, allowed in ((self.down_block_types, DOWN_BLOCK_TYPES), (self.up_block_types, UP_BLOCK_TYPES)):
            for block_type in kind:
                if block_type not in allowed:
                    raise ConfigError(f"unet: unknown block type {block_type!r}; choose from {', '.join(allowed)}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ConfigError(
                f"unet.mid_block_type {self.mid_block_type!r} is not supported; use {MID_BLOCK_TYPES[0]!r}"
            )
        for name in ("in_channels", "out_channels", "cross_attention_dim", "norm_num_groups"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"unet.{name} must be positive, got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ConfigError(f"unet.norm_eps must be positive, got {self.norm_eps}")
        self.layers(), self.transformer_layers()  # each checks its own shape
        heads, attention_levels = self.heads(), self._attention_levels()
        for i, channels in enumerate(self.block_out_channels):
            if channels <= 0 or channels % self.norm_num_groups:
                raise ConfigError(
                    f"unet.block_out_channels[{i}]={channels} must be a positive multiple of "
                    f"norm_num_groups={self.norm_num_groups}"
                )
            if i in attention_levels and channels % heads[i]:
                raise ConfigError(
                    f"unet.block_out_channels[{i}]={channels} is not divisible by its "
                    f"{heads[i]} attention heads (attention_head_dim)"
                )

    def _attention_levels(self) -> set[int]:
        last = len(self.block_out_channels) - 1
        levels = {last}  # the mid block always attends
        levels |= {i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D"}
        levels |= {last - i for i, t in enumerate(self.up_block_types) if t == "CrossAttnUpBlock2D"}
        return levels

    def _per_block(self, name: str) -> list[int]:
        value = getattr(self, name)
        n = len(self.block_out_channels)
        values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
        if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"unet.{name} must be an int or a list of {n} ints (one per block), got {value!r}")
        if min(values) < 1:
            raise ConfigError(f"unet.{name} must be >= 1, got {value!r}")
        return values

    def layers(self) -> list[int]:
        """Resnets per down block (up blocks have one more)."""
        return self._per_block("layers_per_block")

    def transformer_layers(self) -> list[int]:
        """Transformer blocks inside each spatial transformer, per down block."""
        return self._per_block("transformer_layers_per_block")

    def heads(self) -> list[int]:
        """Attention heads per down block (diffusers' `attention_head_dim`)."""
        return self._per_block("attention_head_dim")

    @property
    def downsample_factor(self) -> int:
        """How much smaller the deepest feature map is than the input (H and W must divide by it)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for diffusers' `UNet2DConditionModel` with the same architecture."""
        config = asdict(self)
        del config["gradient_checkpointing"]
        for name, value in config.items():
            if isinstance(value, list):
                config[name] = tuple(value)
        return config
