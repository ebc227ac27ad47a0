"""bf16 weights with an fp32 master copy: mixed precision without autocast (Micikevicius et al. 2018).

The model holds its weights in bf16 and runs forward and backward in bf16, with no per-op casts; the
optimiser updates float32 master copies, which are rounded back into the model after every step, so
updates far smaller than a bf16 ulp still accumulate. The arithmetic matches autocast's (bf16 matmuls
and convolutions, float32 gradients and optimiser state); what goes is autocast's float32 detours
around normalisations and the casts in and out of them, which on a CPU cost more than they save
(scripts/bench_train_diffusion.py --variants: 1.3x for the tiny U-Net, 1.4x for SD 1.5's).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class MasterWeights:
    """Float32 master parameters for `model`, whose parameters are cast to `dtype` here."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.model_parameters = list(model.parameters())
        # taken before the cast: the masters start from the exact float32 weights
        self.parameters = [p.detach().float().clone().requires_grad_(p.requires_grad) for p in self.model_parameters]
        model.to(dtype)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return zip(self.names, self.parameters)

    def gradients_to_master(self) -> None:
        """Add the model's (bf16) gradients onto the masters' float32 ones and clear them: after each
        backward, so that accumulation over micro-batches happens in float32."""
        for model_parameter, master in zip(self.model_parameters, self.parameters):
            if model_parameter.grad is None:
                continue
            if master.grad is None:
                master.grad = model_parameter.grad.float()
            else:
                master.grad.add_(model_parameter.grad)
            model_parameter.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.model_parameters, self.parameters)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict in float32, parameters from the masters (buffers cast up)."""
        state = {name: value.float() if value.is_floating_point() else value for name, value in model.state_dict().items()}
        state.update({name: master.detach().clone() for name, master in self.named_parameters()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, master in self.named_parameters():
            master.copy_(state[name])
        self.copy_to_model()
