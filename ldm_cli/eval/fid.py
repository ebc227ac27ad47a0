"""FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) from Inception features, and both
computed for two folders of images."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ldm_cli.errors import DataError, UsageError
from ldm_cli.eval.inception import INCEPTION_INPUT_SIZE, InceptionFeatures

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _as_float64(array: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(array).to(torch.float64)


def feature_statistics(features: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Mean `[D]` and unbiased covariance `[D, D]` of `[N, D]` features, float64 on CPU."""
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need [N, D] features with N >= 2, got shape {tuple(features.shape)}")
    return features.mean(dim=0).cpu(), torch.cov(features.T).cpu()


def _trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """tr sqrt(Σ1 Σ2) for symmetric PSD Σ1, Σ2, with symmetric eigen-decompositions only.

    Σ1 Σ2 = √Σ1 (√Σ1 Σ2) has the eigenvalues of √Σ1 Σ2 √Σ1, which is symmetric PSD, so the
    trace of the square root is the sum of the square roots of those eigenvalues. This stays
    real and stable for the singular covariances of fewer samples than dimensions.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    middle = (middle + middle.T) / 2  # remove round-off asymmetry before eigvalsh
    return torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()


def _trace_sqrt_product_scipy(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """The same trace through scipy's general matrix square root (pytorch-fid's way)."""
    from scipy import linalg

    s1, s2 = sigma1.cpu().numpy(), sigma2.cpu().numpy()
    root = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        # nearly singular product: a small ridge keeps sqrtm finite
        ridge = np.eye(s1.shape[0]) * 1e-6
        root = linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
    return torch.tensor(float(np.trace(root).real), dtype=torch.float64)


def frechet_distance(
    mu1: Tensor | np.ndarray,
    sigma1: Tensor | np.ndarray,
    mu2: Tensor | np.ndarray,
    sigma2: Tensor | np.ndarray,
    method: Literal["torch", "scipy"] = "torch",
) -> float:
    """Fréchet distance of two Gaussians: |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 sqrt(Σ1 Σ2)), in float64."""
    mu1, sigma1, mu2, sigma2 = (_as_float64(a) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        shapes = [tuple(a.shape) for a in (mu1, mu2, sigma1, sigma2)]
        raise ValueError(f"mismatched statistics: mu {shapes[0]}/{shapes[1]}, sigma {shapes[2]}/{shapes[3]}")
    trace_sqrt = _trace_sqrt_product_scipy(sigma1, sigma2) if method == "scipy" else _trace_sqrt_product(sigma1, sigma2)
    mean_term = (mu1 - mu2).square().sum()
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt.to(mu1.device))


def _polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² with the cubic polynomial kernel: the diagonal k(x_i, x_i) terms are left out."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def kernel_inception_distance(
    features1: Tensor | np.ndarray,
    features2: Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and (population) std of the unbiased MMD² over random subsets.

    Each subset draws `subset_size` rows without replacement from each set; `subset_size`
    is clipped to the smaller set. `seed` makes the draw reproducible.
    """
    x, y = _as_float64(features1), _as_float64(features2)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        rows_x = torch.randperm(x.shape[0], generator=generator)[:size].to(x.device)
        rows_y = torch.randperm(y.shape[0], generator=generator)[:size].to(y.device)
        values.append(mmd2_unbiased(x[rows_x], y[rows_y]))
    stacked = torch.stack(values)
    return float(stacked.mean()), float(stacked.std(unbiased=False))


# --- folders of images -----------------------------------------------------------------------


def list_images(folder: str | Path) -> list[Path]:
    """All png/jpg/webp files under `folder` (recursively), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist or is not a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {path}: {error}") from error
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # uint8 [3, H, W]


def _to_batch(images: list[Tensor], device: torch.device) -> Tensor:
    """uint8 images → float [B, 3, H, W] in [0, 1]; mixed sizes are resized to the Inception input first."""
    images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
    if any(image.shape != images[0].shape for image in images):
        size = (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
        images = [F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0] for image in images]
    return torch.stack(images)


@torch.inference_mode()
def extract_features(
    paths: list[Path],
    inception: InceptionFeatures,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> Tensor:
    """Inception pool features `[N, 2048]` (float32, CPU) of image files."""
    device = torch.device(device)
    loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    features = [inception(_to_batch(batch, device)).cpu() for batch in loader]
    return torch.cat(features)


def compute_fid_kid(
    real_dir: str | Path,
    fake_dir: str | Path,
    inception: InceptionFeatures,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, float | int]:
    """FID and KID between the images of two folders. Moves `inception` to `device`.

    Returns {"fid", "kid_mean", "kid_std", "num_real", "num_fake"}.
    """
    inception = inception.to(device)
    features = {}
    for name, folder in (("real", real_dir), ("fake", fake_dir)):
        paths = list_images(folder)
        if len(paths) < 2:
            suffixes = "/".join(IMAGE_SUFFIXES)
            raise DataError(f"{name} image folder {folder} has {len(paths)} images ({suffixes}); FID/KID need at least 2")
        features[name] = extract_features(paths, inception, batch_size, device, num_workers)

    fid = frechet_distance(*feature_statistics(features["real"]), *feature_statistics(features["fake"]))
    kid_mean, kid_std = kernel_inception_distance(features["real"], features["fake"], kid_subsets, kid_subset_size)
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_real": len(features["real"]),
        "num_fake": len(features["fake"]),
    }
