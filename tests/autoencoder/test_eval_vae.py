from __future__ import annotations

import torch

from ldm_cli.autoencoder.evaluate import evaluate_folder
from ldm_cli.autoencoder.model import AutoencoderConfig, AutoencoderKL
from ldm_cli.bundle import write_bundle
from ldm_cli.config import to_dict


def test_eval_vae_reports_metrics_and_grid(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no LPIPS weights here
    config = AutoencoderConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4)
    meta = {"autoencoder": to_dict(config), "latent_scale": 1.0, "latent_shift": 0.0, "resolution": 16}
    write_bundle(tmp_path / "vae", "autoencoder", {"autoencoder": AutoencoderKL(config).state_dict()}, meta)
    metrics = evaluate_folder(tmp_path / "vae", shapes_dir, limit=10, grid_path=tmp_path / "grid.png", device_name="cpu")
    assert metrics["images"] == 10 and metrics["bad_images"] == 0
    assert 0 < metrics["psnr"] < 40 and -1 <= metrics["ssim"] <= 1
    assert metrics["lpips"].startswith("unavailable") and "loss.perceptual_weight=0" in metrics["lpips"]
    assert (tmp_path / "grid.png").is_file()
