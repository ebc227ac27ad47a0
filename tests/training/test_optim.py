"""Optimiser and learning-rate schedule factory: closed-form schedules, Adafactor's fixed lr, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_cli.config import TrainConfig, load_config
from ldm_cli.errors import ConfigError
from ldm_cli.training.adafactor import Adafactor, copy_stochastic_
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


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "cosine_with_restarts"])
def test_schedules_equal_transformers_get_scheduler(name):
    from transformers import get_scheduler

    train = TrainConfig(lr=1.0, max_steps=40, warmup_steps=7, lr_schedule=name, lr_schedule_steps=30, lr_cycles=3)
    ours = build_lr_schedule(build_optimizer([torch.nn.Parameter(torch.zeros(1))], train), train)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler("constant_with_warmup" if name == "constant" else name, optimizer, num_warmup_steps=7,
                              num_training_steps=30, scheduler_specific_kwargs={"num_cycles": 3} if name == "cosine_with_restarts" else None)
    for _ in range(40):  # past the schedule's span too
        assert ours.get_last_lr() == pytest.approx(reference.get_last_lr(), abs=1e-12)
        ours.optimizer.step(), ours.step(), optimizer.step(), reference.step()


def test_commands_start_without_peft_or_bitsandbytes():
    """Loading configs and the trainers must not pull in peft and bitsandbytes (a second of start-up, and
    bitsandbytes' import-time hub-kernel warning on every command)."""
    import subprocess
    import sys

    code = ("import sys, ldm_cli.config, ldm_cli.training.optim, ldm_cli.diffusion.train, ldm_cli.sampling.commands; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'peft', 'bitsandbytes'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


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


def adafactor_pair(shapes: list[tuple[int, ...]], **options) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    from transformers.optimization import Adafactor as Reference

    generator = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, **options)
    return ours, theirs, [Adafactor(ours, **settings), Reference(theirs, **settings)]


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "beta1": 0.9}])
def test_adafactor_equals_transformers_on_float32_parameters(options):
    shapes = [(7,), (5, 6), (4, 3, 3, 3)]  # unfactored, factored, a convolution's weight
    ours, theirs, optimizers = adafactor_pair(shapes, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(optimizers[0].state[ours[1]]) == set(optimizers[1].state[theirs[1]])  # the same checkpoint state


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    source = torch.full((100_000,), 1.0 + 2**-10)  # an eighth of the way from 1 to the next bf16, 1 + 2**-7
    target = torch.empty(source.shape, dtype=torch.bfloat16)
    copy_stochastic_(target, source, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert target.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 1.0 + 2**-7]).bfloat16()
    copy_stochastic_(target[:3], exact.float(), torch.Generator().manual_seed(0))
    assert torch.equal(target[:3], exact)


def test_adafactor_moves_bf16_weights_by_updates_below_a_bf16_ulp():
    """At lr 4e-4 every step is a tenth of a bf16 ulp below 1.0: round-to-nearest (transformers) never
    moves the weight; stochastic rounding follows the float32 trajectory on average."""
    weights = {name: torch.nn.Parameter(torch.ones(64, 64, dtype=dtype)) for name, dtype in
               [("float32", torch.float32), ("ours", torch.bfloat16), ("nearest", torch.bfloat16)]}
    from transformers.optimization import Adafactor as Reference

    settings = dict(lr=4e-4, relative_step=False, scale_parameter=False, warmup_init=False)
    optimizers = [Adafactor([weights["float32"]], **settings), Adafactor([weights["ours"]], **settings),
                  Reference([weights["nearest"]], **settings)]
    for _ in range(50):
        for weight in weights.values():
            weight.grad = torch.ones_like(weight)
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(weights["nearest"].detach(), torch.ones(64, 64, dtype=torch.bfloat16))
    target = weights["float32"].detach().mean().item()  # 1 - 50 * 4e-4
    assert target == pytest.approx(0.98, abs=1e-6)
    assert weights["ours"].detach().float().mean().item() == pytest.approx(target, abs=2e-4)
