"""Full-reference image metrics: PSNR and SSIM, one value per image of a batch.

Images are `[B, C, H, W]` tensors, by default in [-1, 1] (so `data_range=2`). Both metrics
match scikit-image: `peak_signal_noise_ratio` and `structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` averaged over channels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float(x: Tensor) -> Tensor:
    # bf16/fp16 lose too many digits in E[x^2] - E[x]^2; float64 stays float64
    return x if x.dtype == torch.float64 else x.float()


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two [B, C, H, W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range² / MSE). `inf` for equal images."""
    _check_pair(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        mse = (_as_float(x) - _as_float(y)).square().flatten(1).mean(dim=1)
        return 10.0 * torch.log10(data_range**2 / mse)


@functools.cache
def _gaussian_taps(size: int, sigma: float) -> Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_blur_valid(maps: Tensor, window_size: int, sigma: float) -> Tensor:
    """Separable Gaussian filter of each channel, keeping only positions where the window fits.

    skimage filters with reflect padding and then crops (window_size - 1) / 2 pixels from
    each border before averaging; the kept pixels never see the padding, so a valid
    convolution gives exactly those values without the wasted border work.
    """
    channels = maps.shape[1]
    taps = _gaussian_taps(window_size, sigma).to(device=maps.device, dtype=maps.dtype)
    horizontal = taps.view(1, 1, 1, window_size).expand(channels, 1, 1, window_size)
    vertical = taps.view(1, 1, window_size, 1).expand(channels, 1, window_size, 1)
    maps = F.conv2d(maps, horizontal, groups=channels)
    return F.conv2d(maps, vertical, groups=channels)


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels and positions.

    Gaussian window of 11 taps with sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
    local covariances. Images must be at least 11 pixels on each side.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} pixels, got {tuple(x.shape[-2:])}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _as_float(x), _as_float(y)
        channels = x.shape[1]
        # one depthwise blur for all five local moments
        moments = _gaussian_blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), SSIM_WINDOW_SIZE, SSIM_SIGMA)
        mean_x, mean_y, mean_xx, mean_yy, mean_xy = moments.split(channels, dim=1)
        var_x = mean_xx - mean_x * mean_x
        var_y = mean_yy - mean_y * mean_y
        cov_xy = mean_xy - mean_x * mean_y

        c1 = (SSIM_K1 * data_range) ** 2
        c2 = (SSIM_K2 * data_range) ** 2
        luminance_contrast = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
        normaliser = (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)
        return (luminance_contrast / normaliser).flatten(1).mean(dim=1)
