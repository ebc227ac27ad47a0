"""Adafactor for bf16 weights without float32 master copies (`train.optimizer=adafactor`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.optimization import Adafactor as _TransformersAdafactor


class Adafactor(_TransformersAdafactor):
    """transformers' Adafactor (same arguments, state and update), except that a bf16 parameter takes
    its float32 result by stochastic rounding rather than to nearest: rounding up with probability
    equal to the remainder keeps every update in expectation, where round-to-nearest drops all updates
    below half a bf16 ulp (most of them, at fine-tuning learning rates). The rounding bits are drawn
    from (step, parameter index), so a resumed run rounds as an unbroken one does."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                updated = self._update(p, p.grad.float(), state, group)
                if p.dtype == torch.bfloat16:
                    copy_stochastic_(p, updated, torch.Generator(p.device).manual_seed(int(state["step"]) * 1_000_003 + index))
                elif updated is not p:
                    p.copy_(updated)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, which casts the state to each parameter's dtype, then the float32 state back:
        bf16 moments would lose the precision that stochastic rounding relies on."""
        super().load_state_dict(state_dict)
        parameters = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            parameter = parameters[int(index)]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    self.state[parameter][key] = value.to(parameter.device, copy=True)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """transformers' Adafactor update of one parameter, computed in float32; returns the new value
        (`p` itself when it is float32, updated in place)."""
        factored, use_first_moment = self._get_options(group, grad.shape)
        if not state:
            state["step"], state["RMS"] = 0, 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        value = p if p.dtype == torch.float32 else p.float()
        state["step"] += 1
        state["RMS"] = self._rms(value)
        lr = self._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            update = self._approx_sq_grad(row, col).mul_(grad)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0)).mul_(lr)
        if use_first_moment:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        if group["weight_decay"] != 0:
            value.add_(value, alpha=-group["weight_decay"] * lr)
        return value.add_(-update)


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Round float32 `source` into bf16 `target` stochastically: add 16 random low bits, then truncate
    (a bf16 is the top half of a float32), so that E[target] == source."""
    bits = torch.randint(0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits.add_(source.contiguous().view(torch.int32)).bitwise_and_(-65536)
    target.copy_(bits.view(torch.float32).view(source.shape))
