"""Shared fixtures: tiny datasets and configs that keep every test on the CPU and fast."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# verified weight hashes go to a folder of this test run, not the user's cache
os.environ.setdefault("LDM_CACHE_DIR", tempfile.mkdtemp(prefix="ldm-test-cache-"))
# tests run in parallel (pytest -n 2): one intra-op thread per worker avoids oversubscription
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """24 captioned 16x16 shape images (the built-in dataset, tiny)."""
    from ldm_cli.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, 24, 16, seed=0)
    return root


TINY_VAE_OVERRIDES = [
    "autoencoder.block_out_channels=[8,16]",
    "autoencoder.layers_per_block=1",
    "autoencoder.norm_num_groups=4",
    "data.resolution=16",
    "train=vae_tiny",
    "train.batch_size=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.image_every=2",
    "train.checkpoint_every=2",
    "train.precision=fp32",
    "loss=vae_tiny",
    "loss.perceptual_weight=0",
    "loss.disc_start=1",
    "loss.disc.base_channels=8",
]



@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """12 small scikit-image photos: 5 portrait, 4 landscape, 3 square, with tag captions."""
    from tests.photos import write_photo_folder

    return write_photo_folder(tmp_path_factory.mktemp("photos"))


def pytest_collection_modifyitems(config, items) -> None:
    """`cuda`-marked tests need a GPU; LDM_TEST_DEVICE=cpu runs them on the CPU instead (a dry run)."""
    if torch.cuda.is_available() or os.environ.get("LDM_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ldm(monkeypatch, capsys):
    """Run `ldm ARGS` through cli.main (as the console script does): (exit code, stdout, stderr)."""
    from ldm_cli import cli

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["ldm", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as exit:
            code = exit.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
