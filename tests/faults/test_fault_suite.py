"""Fault suite: kill a short run at random points and resume it; corrupt every kind of file a run
reads and check that each gives one `error:` line (never a traceback) or, for a log, a warning.

Every case runs the real command line (`ldm_cli.cli.main`), in process where a kill is not needed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm_cli.bundle import load_bundle
from ldm_cli.cli import main
from tests.conftest import TINY_VAE_OVERRIDES

STEPS = 6
# the run's own overrides name config groups (autoencoder, train, loss): --resume must accept them again
OVERRIDES = ["autoencoder=tiny", *TINY_VAE_OVERRIDES]


def vae_args(shapes_dir: Path, out: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    return ["train-vae", "--data", str(shapes_dir), "--out", str(out), "--device", "cpu",
            *OVERRIDES, f"train.max_steps={steps}", "train.checkpoint_every=1", *extra]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of `ldm ARGS` run in this process, exactly as the console script runs it."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["ldm", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The single `error:` line of a refused command; fails on a traceback or several lines."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_bundle(run, kind="autoencoder").tensors("autoencoder")


@pytest.fixture(scope="module")
def straight(shapes_dir, tmp_path_factory) -> Path:
    """A finished run, never interrupted: the reference and the source of files to corrupt."""
    from ldm_cli.autoencoder.train import train_autoencoder
    from ldm_cli.config import load_config

    out = tmp_path_factory.mktemp("straight") / "run"
    overrides = [f"data.path={shapes_dir}", *OVERRIDES, f"train.max_steps={STEPS}", "train.checkpoint_every=1"]
    train_autoencoder(load_config("train_vae", overrides), out, overrides, device_name="cpu")
    return out


@pytest.mark.slow
def test_kills_at_random_points_then_resume_equal_a_straight_run(shapes_dir, straight, tmp_path):
    rng = random.Random(14)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ldm_cli.cli", *vae_args(shapes_dir, out)]
    # one thread, as in this process (conftest): the same reductions, so the same rounding
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    checkpoints = out / "checkpoints"
    for how in (signal.SIGTERM, signal.SIGKILL):
        target = rng.randint(1, 3)  # kill once this many checkpoints exist, plus a random delay
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if checkpoints.is_dir() and len([p for p in checkpoints.iterdir() if p.name.startswith("step_")]) >= target:
                time.sleep(rng.uniform(0, 0.3))
                break
            time.sleep(0.02)
        if process.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        process.send_signal(how)
        _, stderr = process.communicate(timeout=120)
        if how == signal.SIGTERM and process.returncode == 130:
            assert "Traceback" not in stderr and "terminated (SIGTERM) at step" in stderr, stderr
    if not (out / "bundle").exists():
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(out)[key], value, rtol=0, atol=1e-6, msg=key)
    with open(out / "metrics.csv") as handle:
        steps = [int(line.split(",")[0]) for line in handle.readlines()[1:] if ",train/loss," in line]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, whatever the kills
    assert not list(out.glob(".lock")) and not list(checkpoints.glob(".tmp-*")) and not list(out.glob(".bundle.*"))


def corrupt_json_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_bytes_inside(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-16:-12] = b"\x00\x00\xc0\x7f"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target, damage, refusal", [
    ("config.yaml", lambda p: p.write_text("command: [unclosed"), "config.yaml is unreadable"),
    ("config.yaml", lambda p: p.write_text("42\n"), "is not an ldm run config"),
    ("checkpoints/step_0000006/state.json", corrupt_json_truncated, "step_0000006 is unreadable"),
    ("checkpoints/step_0000006/state.json", lambda p: p.write_text('{"trainer": {}}'), "step_0000006 does not hold this run's training state"),
    ("checkpoints/step_0000006/state.safetensors", corrupt_json_truncated, "state.safetensors is corrupt or truncated"),
])
def test_a_damaged_run_file_refuses_a_resume_in_one_line(shapes_dir, straight, tmp_path, capsys, monkeypatch, target, damage, refusal):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    damage(run / target)
    code, stderr = run_cli(vae_args(shapes_dir, run, STEPS + 1) + ["--resume"], capsys, monkeypatch)
    assert code != 0 and refusal in error_line(stderr)


def test_a_damaged_log_and_a_dead_processs_lock_never_block_a_resume(shapes_dir, straight, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "metrics.csv").write_bytes(b"\xff\xfe not a csv")
    (run / ".lock").write_text(f"999999999 {__import__('socket').gethostname()}\n")  # no such process
    (run / "checkpoints" / ".tmp-killed").mkdir()  # what a kill during a save leaves
    code, stderr = run_cli(vae_args(shapes_dir, run, STEPS + 1, ("train.checkpoint_every=100",)) + ["--resume"], capsys, monkeypatch)
    assert code == 0, stderr
    assert "metrics.csv is damaged; moved it to metrics.csv.damaged-1" in stderr + capsys.readouterr().out or (run / "metrics.csv.damaged-1").is_file()
    assert (run / "metrics.csv.damaged-1").read_bytes() == b"\xff\xfe not a csv"
    assert not (run / ".lock").exists() and not (run / "checkpoints" / ".tmp-killed").exists()


@pytest.mark.parametrize("target, damage, refusal", [
    ("bundle/bundle.json", corrupt_json_truncated, "bundle.json is unreadable"),
    ("bundle/bundle.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "autoencoder": "tiny"})), "'autoencoder' is 'tiny', not a mapping"),
    ("bundle/bundle.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "latent_scale": "NaN"})), "latent_scale is 'NaN'"),
    ("bundle/autoencoder.safetensors", flip_bytes_inside, "autoencoder.safetensors is corrupt: its sha256"),
    ("bundle/autoencoder.safetensors", lambda p: p.unlink(), "autoencoder.safetensors is missing"),
])
def test_a_damaged_bundle_is_refused_by_the_next_stage_in_one_line(shapes_dir, straight, tmp_path, capsys, monkeypatch, target, damage, refusal):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    damage(run / target)
    code, stderr = run_cli(["encode", "--vae", str(run), "--data", str(shapes_dir), "--out", str(tmp_path / "latents"), "--device", "cpu"], capsys, monkeypatch)
    assert code != 0 and refusal in error_line(stderr)
    assert not (tmp_path / "latents").exists()


def test_resume_repeats_the_runs_own_group_choices_and_refuses_another_architecture(shapes_dir, straight, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    same = vae_args(shapes_dir, run, STEPS + 1)  # the original command line, longer
    code, stderr = run_cli([*same, "--resume"], capsys, monkeypatch)
    assert code == 0, stderr
    changed = vae_args(shapes_dir, run, STEPS + 2, ("autoencoder.layers_per_block=2",))
    code, stderr = run_cli([*changed, "--resume"], capsys, monkeypatch)
    assert code == 7 and "--resume cannot change autoencoder.layers_per_block: saved 1, now 2" in error_line(stderr)


def test_a_failed_start_writes_nothing_into_out(shapes_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    missing = ["loss.perceptual_weight=1", f"loss.lpips_vgg_path={tmp_path / 'no-vgg.pth'}"]
    code, stderr = run_cli(vae_args(shapes_dir, out, 2, tuple(missing)), capsys, monkeypatch)
    assert code != 0 and error_line(stderr) and not out.exists()


def test_a_nan_loss_exits_non_zero_naming_the_step_and_writes_no_bundle(shapes_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, stderr = run_cli(vae_args(shapes_dir, out, 3, ("loss.kl_weight=inf",)), capsys, monkeypatch)
    assert code == 8 and "training stopped: the loss is inf at step 1" in error_line(stderr)
    assert not (out / "bundle").exists() and not list((out / "checkpoints").glob("step_*"))
