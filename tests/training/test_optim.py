"""Optimiser and learning-rate schedule factory: closed-form schedules, Adafactor's fixed lr, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_cli.config import TrainConfig, load_config
from ldm_cli.errors import ConfigError
from ldm_cli.training.optim import build_lr_schedule, build_optimizer


def lrs(**changes) -> list[float]:
    train = TrainConfig(**{"lr": 1.0, "max_steps": 10, "warmup_steps": 2, **changes})
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(3))], train)
    schedule = build_lr_schedule(optimizer, train)
    values = []
    for _ in range(train.max_steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return values


def test_schedules_match_their_closed_forms():
    warm = [0.0, 0.5]
    assert lrs(lr_schedule="constant") == pytest.approx(warm + [1.0] * 8)
    assert lrs(lr_schedule="linear") == pytest.approx(warm + [(10 - s) / 8 for s in range(2, 10)])
    assert lrs(lr_schedule="cosine") == pytest.approx(warm + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)])
    restarts = lrs(lr_schedule="cosine_with_restarts", lr_cycles=2)
    assert restarts == pytest.approx(warm + [0.5 * (1 + math.cos(math.pi * ((2 * (s - 2) / 8) % 1))) for s in range(2, 10)])
    # the span can outlast max_steps, so a run extended on resume keeps its curve
    assert lrs(lr_schedule="linear", lr_schedule_steps=18)[-1] == pytest.approx((18 - 9) / 16)


def test_adafactor_steps_at_the_fixed_learning_rate():
    train = TrainConfig(optimizer="adafactor", lr=0.1, warmup_steps=0)
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = build_optimizer([weight], train)
    weight.grad = torch.full((4, 4), 3.0)
    optimizer.step()
    # a constant gradient's RMS-normalised update is 1 per element: the step is exactly lr
    torch.testing.assert_close(weight.detach(), torch.full((4, 4), 0.9))
    assert set(optimizer.state[weight]) >= {"exp_avg_sq_row", "exp_avg_sq_col"}  # factored, no first moment
    assert "exp_avg" not in optimizer.state[weight]


@pytest.mark.parametrize("override,message", [
    ("train.optimizer=sgd", "train.optimizer: expected adamw | adafactor | adamw8bit, got 'sgd'"),
    ("train.lr_schedule=step", "train.lr_schedule: expected constant | cosine | linear | cosine_with_restarts"),
    ("train.lr_cycles=0", "train.lr_cycles: expected a positive integer"),
])
def test_bad_choices_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        load_config("train_diffusion", [override])
