"""`ldm eval-vae`: reconstruction quality of an autoencoder on an image folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ldm_cli.autoencoder.load import load_autoencoder
from ldm_cli.autoencoder.lpips import load_lpips
from ldm_cli.autoencoder.train import collate_images
from ldm_cli.data.images import ImageFolderDataset
from ldm_cli.errors import MissingWeightsError
from ldm_cli.eval.metrics import psnr, ssim
from ldm_cli.grid import make_grid, save_image
from ldm_cli.training.precision import resolve_device


@torch.no_grad()
def evaluate_folder(
    vae: Path,
    data: Path,
    resolution: int | None = None,
    limit: int = 256,
    grid_path: Path | None = None,
    device_name: str = "auto",
    batch_size: int = 16,
) -> dict[str, float | int | str]:
    device = resolve_device(device_name)
    autoencoder = load_autoencoder(vae, device=device)
    resolution = resolution or autoencoder.resolution
    dataset = ImageFolderDataset(data, resolution=resolution, split="all")
    subset = Subset(dataset, range(min(limit, len(dataset))))
    try:
        lpips = load_lpips().to(device)
    except MissingWeightsError as missing:
        lpips, lpips_note = None, str(missing)
    scores: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "lpips": []}
    first_batch = None
    for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate_images):
        images = batch["image"].to(device)
        model = autoencoder.model
        recon = model.decode(model.encode(images).mode()).clamp(-1, 1)
        scores["psnr"].append(psnr(recon, images))
        scores["ssim"].append(ssim(recon, images))
        if lpips is not None:
            scores["lpips"].append(lpips(recon, images))
        if first_batch is None:
            first_batch = torch.stack([images[:8], recon[:8]], dim=1).flatten(0, 1)
    metrics: dict[str, float | int | str] = {name: float(torch.cat(v).mean()) for name, v in scores.items() if v}
    metrics["images"] = len(subset)
    metrics["bad_images"] = len(dataset.bad_files)
    if lpips is None:
        metrics["lpips"] = f"unavailable: {lpips_note}"
    if grid_path is not None and first_batch is not None:
        save_image(make_grid(first_batch.cpu(), columns=4, scale=max(1, 128 // resolution)), grid_path)
    return metrics
