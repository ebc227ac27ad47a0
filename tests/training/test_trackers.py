"""`train.log_with`: TensorBoard by default, Weights & Biases in its offline mode, or metrics.csv only."""

from __future__ import annotations

import csv
import re
import sys

import pytest

from ldm_cli.autoencoder.train import train_autoencoder
from ldm_cli.config import load_config
from ldm_cli.errors import ConfigError
from ldm_cli.training.trackers import Trackers
from tests.conftest import TINY_VAE_OVERRIDES


def _tiny(shapes_dir, steps: int, log_with: str):
    overrides = [f"data.path={shapes_dir}", f"train.max_steps={steps}", *TINY_VAE_OVERRIDES, f"train.log_with={log_with}"]
    return load_config("train_vae", overrides), overrides


@pytest.mark.parametrize("value", ["[tensorboard,mlflow]", "[none,wandb]", "[]"])
def test_bad_log_with_is_one_line(value):
    with pytest.raises(ConfigError, match=r"train.log_with: expected one or more of tensorboard, wandb") as error:
        load_config("train_vae", [f"train.log_with={value}"])
    assert "\n" not in str(error.value)


def test_default_is_tensorboard():
    assert load_config("train_vae").train.log_with == ["tensorboard"]


def test_missing_wandb_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install 'ldm-cli\[wandb\]'"):
        Trackers(["tensorboard", "wandb"], tmp_path)
    assert Trackers(["wandb"], tmp_path, enabled=False).sinks == []  # other ranks never import it


def test_none_keeps_metrics_csv_only(shapes_dir, tmp_path):
    config, overrides = _tiny(shapes_dir, 2, "[none]")
    train_autoencoder(config, tmp_path / "run", overrides)
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.slow
def test_wandb_offline_writes_metrics_images_and_config(shapes_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, overrides = _tiny(shapes_dir, 2, "[tensorboard,wandb]")
    run = tmp_path / "run"
    train_autoencoder(config, run, overrides)

    assert (run / "tensorboard").is_dir()
    [offline_run] = list((run / "wandb").glob("offline-run-*"))
    run_id = (run / "wandb_run_id").read_text().strip()
    assert offline_run.name.endswith(run_id) and list(offline_run.glob(f"run-{run_id}.wandb"))
    # an offline run is one protobuf log (the W&B core writes it; wandb has no reader for it in Python):
    # its JSON values and keys are stored as plain bytes
    log = next(offline_run.glob("run-*.wandb")).read_bytes()
    assert b'"block_out_channels":[8,16]' in log and b'"log_with":["tensorboard","wandb"]' in log  # the composed config
    # each step's value appears in its history record and again in the run summary
    logged = list(dict.fromkeys(float(v) for v in re.findall(rb"\ntrain/loss\x82\x01.([-0-9.e+]+)", log)))
    with open(run / "metrics.csv", newline="") as handle:
        expected = [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == "train/loss"]
    assert len(logged) == 2 and logged == pytest.approx(expected, rel=1e-5)
    assert b"eval/psnr" in log and b"images/preview" in log
    previews = list((offline_run / "files" / "media" / "images").rglob("*.png"))
    assert len(previews) == 1 and previews[0].name.startswith("preview_2_")  # image_every=2: the step-2 grid
