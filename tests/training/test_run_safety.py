"""Run directories, metrics logs and the training loop under kills, NaNs, locks and damaged files."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ldm_cli.checkpoint import CheckpointManager
from ldm_cli.config import TrainConfig
from ldm_cli.errors import BundleError, RunDirError, TrainingError
from ldm_cli.training.logger import HEADER, MetricsLogger
from ldm_cli.training.loop import TrainingInterrupted, check_finite_loss, train_loop
from ldm_cli.training.run_dir import LOCK_FILE, RunLock, open_run, start_run


# ---------------------------------------------------------------- a toy trainer for the loop


class ToyTrainer:
    """Fits w·x = 1 with SGD; an item holding NaN makes that step's loss NaN."""

    def __init__(self) -> None:
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.optimizer = torch.optim.SGD([self.weight], lr=0.1)
        self.on_step = None

    def train_step(self, micro_batches, step):
        if self.on_step:
            self.on_step(step)
        x = torch.cat([b for b in micro_batches])
        loss = ((x @ self.weight - 1) ** 2).mean()
        loss.backward()
        check_finite_loss(float(loss.detach()), self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return {"loss": float(loss.detach())}

    def state_dict(self):
        return {"weight": self.weight.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.weight.copy_(state["weight"])

    def evaluate(self, step):
        return {"w0": float(self.weight[0].detach())}

    def write_images(self, step, path):
        pass


def toy_data(nan_at: int | None = None) -> torch.Tensor:
    data = torch.ones(8, 2)
    if nan_at is not None:
        data[nan_at] = float("nan")
    return data


def toy_config(**values) -> TrainConfig:
    base = dict(max_steps=6, batch_size=1, log_every=1, eval_every=100, image_every=100, checkpoint_every=2, seed=0)
    return TrainConfig(**{**base, **values})


def test_a_nan_loss_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(tmp_path):
    # batch order is shuffled: find the step that meets the NaN item, then poison it
    order = [batch[0] for batch in __import__("ldm_cli.training.batches", fromlist=["EpochBatches"]).EpochBatches(8, 1, 0).epoch(0)]
    bad_step = 5
    trainer = ToyTrainer()
    with pytest.raises(TrainingError, match=f"the loss is nan at step {bad_step}; the last good checkpoint is .*step_0000004") as stop:
        train_loop(trainer, toy_data(nan_at=order[bad_step - 1]), toy_config(), tmp_path)
    assert stop.value.exit_code == 8
    assert [p.name for p in CheckpointManager(tmp_path).all()] == ["step_0000002", "step_0000004"]
    assert torch.isfinite(trainer.weight).all()
    with open(tmp_path / "metrics.csv") as handle:
        assert max(int(row["step"]) for row in csv.DictReader(handle)) == bad_step - 1


def test_skipping_non_finite_steps_up_to_a_limit(tmp_path):
    order = [batch[0] for batch in __import__("ldm_cli.training.batches", fromlist=["EpochBatches"]).EpochBatches(8, 1, 0).epoch(0)]
    trainer = ToyTrainer()
    (tmp_path / "skip").mkdir()
    assert train_loop(trainer, toy_data(nan_at=order[2]), toy_config(max_nonfinite_steps=1), tmp_path / "skip") == 6
    assert torch.isfinite(trainer.weight).all() and float(trainer.weight.detach().sum()) > 0
    # the skipped count is part of the resumed state: a second NaN is over the limit
    with pytest.raises(TrainingError, match="after 1 skipped step"):
        train_loop(ToyTrainer(), toy_data(nan_at=order[2]), toy_config(max_steps=16, max_nonfinite_steps=1), tmp_path / "skip")


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_ends_at_the_step_boundary_with_a_checkpoint_and_twice_stops_at_once(tmp_path, signals):
    trainer = ToyTrainer()

    def terminate_during(step):
        if step == 3:  # inside the fourth step
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_step = terminate_during
    previous = signal.getsignal(signal.SIGTERM)
    message = "terminated \\(SIGTERM\\) at step 4; checkpoint saved" if signals == 1 else "stopped at once during step 4; nothing saved"
    with pytest.raises(TrainingInterrupted, match=message):
        train_loop(trainer, toy_data(), toy_config(checkpoint_every=3), tmp_path)
    assert CheckpointManager(tmp_path).latest().name == ("step_0000004" if signals == 1 else "step_0000003")
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the loop's only while it runs


# ---------------------------------------------------------------- metrics.csv


@pytest.mark.parametrize("content", ["", "step,name\n", "garbage\x00\x01\n1,a", "1,train/loss,0.5,1.0\n"])
def test_a_damaged_log_is_set_aside_and_never_blocks_a_resume(tmp_path, content):
    (tmp_path / "metrics.csv").write_text(content)
    logger = MetricsLogger(tmp_path, resume_step=4)
    logger.log(5, {"loss": 1.0}, "train/")
    logger.close()
    rows = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert rows[0] == HEADER and [r[:3] for r in rows[1:]] == [["5", "train/loss", "1"]]
    assert (tmp_path / "metrics.csv.damaged-1").read_text() == content


def test_the_header_is_on_disk_at_creation_and_a_cut_last_row_is_dropped(tmp_path):
    logger = MetricsLogger(tmp_path)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [",".join(HEADER)]  # before close
    logger.log(1, {"loss": 1.0})
    logger.log(2, {"loss": 2.0})
    logger.close()
    with open(tmp_path / "metrics.csv", "a") as handle:
        handle.write("3,lo")  # a kill mid-row
    MetricsLogger(tmp_path, resume_step=1).close()
    rows = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert [r[0] for r in rows[1:]] == ["1"]


# ---------------------------------------------------------------- run directories


@dataclass
class Part:
    width: int = 4


@dataclass
class Run:
    model: Part = field(default_factory=Part)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_open_run_writes_nothing_and_start_run_takes_the_directory(tmp_path):
    out = tmp_path / "run"
    open_run(out, "cmd", Run(), [])
    assert not out.exists()  # a start that fails after deciding leaves no trace
    (out / "checkpoints" / ".tmp-abc").mkdir(parents=True)
    (out / ".bundle.tmp-xyz").mkdir()
    (out / "checkpoints" / "step_0000002").mkdir()
    with start_run(out, "cmd", Run()):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        assert (out / "config.yaml").is_file()
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
        assert not (out / ".bundle.tmp-xyz").exists()
    assert not (out / LOCK_FILE).exists()


def test_a_second_trainer_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match=f"in use by process {os.getpid()} on .*delete .*{LOCK_FILE} if that process is gone"):
        RunLock(tmp_path).acquire()
    first.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead.pid} {__import__('socket').gethostname()}\n")
    second = RunLock(tmp_path)
    second.acquire()
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    second.release()


@pytest.mark.parametrize("content, message", [
    ("command: [unclosed", "config.yaml is unreadable"),
    ("just a string\n", "is not an ldm run config"),
    ("command: cmd\n", "is not an ldm run config"),
])
def test_a_damaged_config_yaml_is_one_line(tmp_path, content, message):
    (tmp_path / "config.yaml").write_text(content)
    with pytest.raises(RunDirError, match=message):
        open_run(tmp_path, "cmd", Run(), [])


def test_a_finished_run_is_never_silently_resumed(tmp_path):
    with start_run(tmp_path, "cmd", Run(train=TrainConfig(max_steps=4))):
        pass
    CheckpointManager(tmp_path).save(4, {"x": torch.ones(1)})
    (tmp_path / "bundle").mkdir()
    longer = Run(train=TrainConfig(max_steps=8))
    with pytest.raises(RunDirError, match="is complete \\(4 steps\\).*--resume train.max_steps"):
        open_run(tmp_path, "cmd", longer, [])
    config, resuming = open_run(tmp_path, "cmd", longer, ["train.max_steps=8"], resume=True)
    assert config.train.max_steps == 8 and resuming


def test_resume_accepts_the_runs_own_group_choices_and_refuses_a_changed_architecture(tmp_path):
    with start_run(tmp_path, "cmd", Run(model=Part(width=8))):
        pass
    # `model=wide` composed afresh gives the saved section back: accepted
    config, _ = open_run(tmp_path, "cmd", Run(model=Part(width=8)), ["model=wide", "train.max_steps=9"], resume=True)
    assert config.model.width == 8 and config.train.max_steps == 9
    with pytest.raises(RunDirError, match="--resume cannot change model.width: saved 8, now 16"):
        open_run(tmp_path, "cmd", Run(model=Part(width=16)), ["model=wider"], resume=True)
    with pytest.raises(RunDirError, match="--resume cannot change model.width: saved 8, now 2"):
        open_run(tmp_path, "cmd", Run(), ["model.width=2"], resume=True)


def test_a_damaged_checkpoint_state_is_one_line(tmp_path):
    CheckpointManager(tmp_path).save(2, {"x": torch.ones(1)})  # a state without the loop's keys
    with pytest.raises(BundleError, match="step_0000002 does not hold this run's training state"):
        train_loop(ToyTrainer(), toy_data(), toy_config(), tmp_path)


@pytest.mark.parametrize("name", ["train_vae", "train_diffusion"])
def test_dataloader_workers_default_to_the_cores_available(name):
    from ldm_cli.config import load_config
    from ldm_cli.training.loop import default_workers

    assert load_config(name).train.num_workers is None
    cores = len(os.sched_getaffinity(0))
    assert default_workers(None) == min(4, cores)  # never more than PyTorch's suggested maximum
    assert default_workers(3) == 3
