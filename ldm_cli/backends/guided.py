"""The U-Net as a sampling run calls it: what stays fixed over a run is computed once, outside the blocks.

- Text keys/values: the text is fixed while an image is sampled, so every cross-attention's keys and
  values are projected once per run (`CachedCrossAttention`).
- Time projections: a run visits a known list of timesteps, so every resnet's projection of the time
  embedding is computed for all of them in one matmul per resnet (`CachedTimeProjection`).
- Classifier-free guidance: one latent with n texts ([uncond, cond]). The layers before the first
  cross-attention see the same input for every text, so they run once; forward pre-hooks widen the
  feature map to the text's rows where the text enters (each spatial transformer) and the skips the up
  path concatenates (DiT's `forward_with_cfg`, without touching the blocks).

`GuidedUNet(unet)` installs this on `unet` in place (parameters stay; the run's caches do not enter the
state dict); `begin_run` sets a run's text and timesteps, and calling it runs one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_cli.backends.modules import retype
from ldm_cli.diffusion.transformer import Attention, SpatialTransformer, TransformerBlock, merge_heads, split_heads
from ldm_cli.diffusion.unet import ResnetBlock, UNet, UpBlock


def widen(x: Tensor, batch: int) -> Tensor:
    """`x` ([B, ...]) as `batch` = n·B rows: n copies of the batch, in the order of the text rows
    [copy 0 of every sample, copy 1, ...]; unchanged when it already has `batch` rows."""
    if x.shape[0] == batch:
        return x
    return torch.cat([x] * (batch // x.shape[0]))  # cat keeps channels_last, where repeat would not


@dataclass
class RunState:
    """What the swapped modules read during one sampling step."""

    text: Optional[Tensor] = None  # [n·B, L, D]
    keys_values: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per cross-attention
    time_bias: Optional[list[Tensor]] = None  # per resnet, [1, C]: the current step's


class CachedCrossAttention(Attention):
    """Cross-attention reading the run's projected text keys and values (`RunState.keys_values`)."""

    state: RunState
    index: int

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        k, v = self.state.keys_values[self.index]
        return self.to_out[0](merge_heads(self.attend(split_heads(self.to_q(x), self.heads), k, v)))


class CachedTimeProjection(nn.Linear):
    """A resnet's time-embedding projection reading the current step's row (`RunState.time_bias`)."""

    state: RunState
    index: int

    def forward(self, temb: Tensor) -> Tensor:
        return self.state.time_bias[self.index]


class GuidedUNet:
    """`unet` for sampling runs: `begin_run(text, timesteps)`, then `self(sample, step)` per step -> [n·B, ...]."""

    def __init__(self, unet: UNet) -> None:
        self.unet = unet
        self.state = RunState()
        self.attentions: list[CachedCrossAttention] = []
        self.projections: list[CachedTimeProjection] = []
        for block in [m for m in unet.modules() if isinstance(m, TransformerBlock)]:
            block.attn2 = self._bind(retype(block.attn2, CachedCrossAttention), len(self.attentions))
            self.attentions.append(block.attn2)
        for resnet in [m for m in unet.modules() if isinstance(m, ResnetBlock)]:
            resnet.time_emb_proj = self._bind(retype(resnet.time_emb_proj, CachedTimeProjection), len(self.projections))
            self.projections.append(resnet.time_emb_proj)
        for module in unet.modules():
            if isinstance(module, SpatialTransformer):
                module.register_forward_pre_hook(self._widen_input)
            elif isinstance(module, UpBlock):
                module.register_forward_pre_hook(self._widen_skips)
        self._time_table: list[Tensor] = []
        self._steps: dict[float, int] = {}

    def _bind(self, module: CachedCrossAttention | CachedTimeProjection, index: int):
        module.state, module.index = self.state, index
        return module

    def _widen_input(self, module: nn.Module, args: tuple) -> tuple:
        return (widen(args[0], self.state.text.shape[0]), *args[1:])

    def _widen_skips(self, module: nn.Module, args: tuple) -> tuple:
        x, skips, *rest = args
        return (x, [widen(skip, x.shape[0]) for skip in skips], *rest)

    def _project_time(self, timesteps: Tensor, dtype: torch.dtype) -> list[Tensor]:
        """Every resnet's time bias [S, C] for the timesteps [S], one matmul per resnet."""
        temb = F.silu(self.unet.time_embedding_of(timesteps, timesteps.numel(), dtype))
        return [F.linear(temb, projection.weight, projection.bias) for projection in self.projections]

    def begin_run(self, text: Tensor, timesteps: Tensor, keys: Sequence[float], dtype: torch.dtype) -> None:
        """Project `text` [n·B, L, D] for every cross-attention and the time embedding of `timesteps` [S]
        for every resnet; step i of the run is then called with `keys[i]` (the sampler's σ)."""
        self.state.text = text
        self.state.keys_values = [attention.keys_values(text) for attention in self.attentions]
        self._time_table = self._project_time(timesteps, dtype) if len(keys) else []
        self._steps = {key: i for i, key in enumerate(keys)}

    @torch.no_grad()
    def __call__(self, sample: Tensor, timestep: Tensor, key: float) -> Tensor:
        """The U-Net on `sample` [B, ...] at `timestep` (one for the whole batch; `key` names it among the
        run's steps) for each of the run's texts: [n·B, ...], texts-major as the text rows."""
        row = self._steps.get(key)
        if row is not None:
            self.state.time_bias = [table[row : row + 1] for table in self._time_table]
        else:  # a σ off the run's grid (an adaptive sampler): projected now
            self.state.time_bias = self._project_time(timestep.reshape(-1)[:1], sample.dtype)
        return self.unet(sample, timestep, self.state.text)
