import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm_cli.eval.metrics import psnr, ssim


def _random_pair(generator: torch.Generator, shape=(3, 3, 32, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def _structured_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth gradients, a checkerboard and a flat region, against a blurred/shifted copy."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 36), indexing="ij")
    checker = ((torch.arange(48)[:, None] // 6 + torch.arange(36)[None, :] // 6) % 2).double() * 2 - 1
    flat = torch.full((48, 36), 0.25, dtype=torch.float64)
    x = torch.stack([torch.stack([rows, cols, checker]), torch.stack([flat, rows * cols, torch.sin(6 * rows)])]).double()
    y = torch.roll(x, shifts=(1, 2), dims=(2, 3)) * 0.8 + 0.05
    y[1, 0] = flat  # identical channel: contributes SSIM 1
    return x, y


def _skimage_per_image(metric, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return np.array([metric(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy()) for a, b in zip(x, y)])


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0
    )


@pytest.mark.parametrize("source", ["random", "structured"])
def test_psnr_matches_skimage(source):
    x, y = _random_pair(torch.Generator().manual_seed(0)) if source == "random" else _structured_pair()
    expected = _skimage_per_image(lambda a, b: peak_signal_noise_ratio(a, b, data_range=2.0), x, y)
    got = psnr(x, y)
    assert got.shape == (x.shape[0],)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4)
    # float32 input gives the same numbers
    np.testing.assert_allclose(psnr(x.float(), y.float()).numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("source", ["random", "structured"])
def test_ssim_matches_skimage(source):
    x, y = _random_pair(torch.Generator().manual_seed(1)) if source == "random" else _structured_pair()
    expected = _skimage_per_image(_skimage_ssim, x, y)
    assert np.all(expected < 0.99)  # the pairs really differ
    np.testing.assert_allclose(ssim(x, y).numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ssim(x.float(), y.float()).numpy(), expected, rtol=0, atol=1e-4)


def test_ssim_uses_the_data_range():
    x, y = _structured_pair()
    expected = _skimage_per_image(
        lambda a, b: structural_similarity(
            a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        ),
        x,
        y,
    )
    np.testing.assert_allclose(ssim(x, y, data_range=1.0).numpy(), expected, atol=1e-6)


def test_identical_images():
    x, _ = _random_pair(torch.Generator().manual_seed(2))
    torch.testing.assert_close(ssim(x, x), torch.ones(x.shape[0], dtype=x.dtype))
    assert torch.isinf(psnr(x, x)).all()


def test_low_precision_inputs_are_computed_in_float32():
    x, y = _random_pair(torch.Generator().manual_seed(3))
    reference = ssim(x, y).float()
    got = ssim(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, atol=5e-3, rtol=0)  # only the bf16 rounding of the inputs
    assert psnr(x.half(), y.half()).dtype == torch.float32


def test_rejects_bad_shapes():
    x = torch.zeros(1, 3, 10, 32)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
