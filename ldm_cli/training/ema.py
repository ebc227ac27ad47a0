"""Exponential moving average of model weights (the weights sampling uses)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Protocol, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class HasParameters(Protocol):
    """A module, or the float32 master copies of one (training/master_weights.py)."""

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]: ...


class EMA:
    """EMA with the usual warm-up: decay min(decay, (1 + n) / (10 + n)) after n updates, so a short
    run's average is not dominated by its random initial weights."""

    def __init__(self, model: HasParameters, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: HasParameters) -> None:
        names = list(self.shadow)
        params = dict(model.named_parameters())
        current = [params[name].detach().float() for name in names]
        torch._foreach_lerp_([self.shadow[name] for name in names], current, 1.0 - self.current_decay())
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        # copy into the shadow in place: it stays on the parameters' device (state is read on the CPU)
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])
        self.updates = int(state.get("__updates__", 0))

    def weights_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state dict with EMA parameters in place of the trained ones."""
        state = model.state_dict()
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype)
        return state

    def averaged(self, model: ModuleT) -> ModuleT:
        """A copy of `model` holding the EMA weights (to evaluate and ship); `model` is left as it is."""
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.weights_for(model))
        return averaged
