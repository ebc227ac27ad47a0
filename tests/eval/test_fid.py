import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from ldm_cli.errors import BundleError, DataError, MissingWeightsError, UsageError
from ldm_cli.eval.fid import (
    compute_fid_kid,
    extract_features,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    list_images,
)
from ldm_cli.eval.inception import (
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
    fid_inception_v3,
    load_inception,
)

TORCHVISION_FILE = "inception_v3_google-0cc3c7bd.pth"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _well_scaled(net: nn.Module) -> nn.Module:
    # default init shrinks activations layer after layer; He init keeps features O(1),
    # so comparisons between implementations are not trivially satisfied by zeros
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_mean, -0.1, 0.1)
            nn.init.uniform_(module.running_var, 0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory) -> tuple[str, nn.Module]:
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("tv") / "random_inception.pth"
    torch.save(_well_scaled(reference).state_dict(), path)
    return str(path), reference.eval()


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fid") / "random_fid_inception.pth"
    torch.save(_well_scaled(fid_inception_v3()).state_dict(), path)
    return str(path)


# --- Fréchet distance --------------------------------------------------------------------------


def _random_covariance(generator: np.random.Generator, dim: int) -> np.ndarray:
    factor = generator.normal(size=(dim, dim + 4))
    return factor @ factor.T / dim


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for dim in (3, 16, 64):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
        trace_sqrt = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
        assert frechet_distance(mu1, sigma1, mu2, sigma2, method="scipy") == pytest.approx(expected, rel=1e-9)
        # torch tensors in float32 are accepted too
        as_tensors = [torch.tensor(a, dtype=torch.float32) for a in (mu1, sigma1, mu2, sigma2)]
        assert frechet_distance(*as_tensors) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    variances1, variances2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + np.sum((np.sqrt(variances1) - np.sqrt(variances2)) ** 2)  # = 5 + 4 + 1
    assert frechet_distance(mu1, np.diag(variances1), mu2, np.diag(variances2)) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(10.0)


def test_feature_statistics_match_numpy():
    features = np.random.default_rng(1).normal(size=(40, 8))
    mu, sigma = feature_statistics(torch.tensor(features, dtype=torch.float32))
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), features.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(features, rowvar=False), atol=1e-6)


@pytest.mark.parametrize("num_samples", [200, 10])  # full-rank and singular covariance
def test_fid_of_identical_sets_is_zero(num_samples):
    features = torch.randn(num_samples, 64, generator=torch.Generator().manual_seed(2))
    statistics = feature_statistics(features)
    assert abs(frechet_distance(*statistics, *statistics)) < 1e-5
    shifted = feature_statistics(features + 1.0)
    assert frechet_distance(*statistics, *shifted) == pytest.approx(64.0, rel=1e-6)  # |Δμ|² only


# --- KID -----------------------------------------------------------------------------------------


def _numpy_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Term by term from the definition, no vectorised tricks."""

    def kernel(a, b):
        return (np.dot(a, b) / len(a) + 1) ** 3

    m, n = len(x), len(y)
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_x + within_y - 2 * across


def test_kid_matches_numpy_reference_when_subsets_cover_the_sets():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 16)), rng.normal(loc=0.3, size=(12, 16))
    # subset_size is clipped to the 12 samples: every subset is the whole set
    mean, std = kernel_inception_distance(x, y, subsets=5, subset_size=1000)
    assert mean == pytest.approx(_numpy_mmd2_unbiased(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 16))
    same = rng.normal(size=(50, 16))
    other = rng.normal(loc=0.5, size=(50, 16))
    mean_same, std_same = kernel_inception_distance(x, same, subsets=20, subset_size=20)
    mean_other, _ = kernel_inception_distance(x, other, subsets=20, subset_size=20)
    assert std_same > 0
    assert abs(mean_same) < 0.2 * mean_other  # unbiased: ~0 for one distribution
    assert kernel_inception_distance(x, same, subsets=20, subset_size=20) == (mean_same, std_same)  # seeded


# --- Inception blocks and weight loading -------------------------------------------------------


def _copy_of(block_class, source: nn.Module, *args) -> nn.Module:
    block = block_class(*args)
    block.load_state_dict(source.state_dict())
    return block.eval()


@pytest.mark.parametrize(
    "plain, fid_variant, args, pool_channels",
    [
        (torchvision.models.inception.InceptionA, FIDInceptionA, (8, 4), 4),
        (torchvision.models.inception.InceptionC, FIDInceptionC, (8, 6), 192),
        (torchvision.models.inception.InceptionE, FIDInceptionE_1, (8,), 192),
    ],
)
def test_fid_blocks_average_over_real_pixels_only(plain, fid_variant, args, pool_channels):
    torch.manual_seed(0)
    reference = _well_scaled(plain(*args)).eval()
    variant = _copy_of(fid_variant, reference, *args)
    x = torch.randn(2, args[0], 7, 7)
    with torch.no_grad():
        expected, got = reference(x), variant(x)
        # mean over the real pixels = zero-padded sum / number of real pixels under the window
        pixel_count = F.avg_pool2d(torch.ones(1, 1, 7, 7), 3, stride=1, padding=1)
        expected_pool = reference.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1) / pixel_count)
    torch.testing.assert_close(got[:, :-pool_channels], expected[:, :-pool_channels])
    torch.testing.assert_close(got[:, -pool_channels:], expected_pool)
    assert not torch.allclose(got[:, -pool_channels:], expected[:, -pool_channels:])  # borders differ


def test_fid_block_e2_max_pools():
    torch.manual_seed(0)
    reference = _well_scaled(torchvision.models.inception.InceptionE(8)).eval()
    variant = _copy_of(FIDInceptionE_2, reference, 8)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected, got = reference(x), variant(x)
        padded = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
        expected_pool = reference.branch_pool(padded.unfold(2, 3, 1).unfold(3, 3, 1).amax(dim=(-1, -2)))
    torch.testing.assert_close(got[:, :-192], expected[:, :-192])
    torch.testing.assert_close(got[:, -192:], expected_pool)


def test_fid_network_has_the_pytorch_fid_keys():
    # pytorch-fid builds torchvision's Inception3 with 1008 classes and no aux head, then swaps blocks
    expected = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net = fid_inception_v3()
    expected_shapes = {key: value.shape for key, value in expected.state_dict().items()}
    assert {key: value.shape for key, value in net.state_dict().items()} == expected_shapes
    assert type(net.Mixed_5b) is FIDInceptionA and type(net.Mixed_6e) is FIDInceptionC
    assert type(net.Mixed_7b) is FIDInceptionE_1 and type(net.Mixed_7c) is FIDInceptionE_2


def _images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_torchvision_weights_match_torchvision_forward(torchvision_weights):
    path, reference = torchvision_weights
    inception = load_inception(path)  # auto → torchvision
    assert inception.layout == "torchvision"
    images = _images(1)
    with torch.inference_mode():
        features = inception(images)
        # torchvision's pretrained recipe: ImageNet-normalised input, transform_input=True
        reference.transform_input = True
        reference.fc = nn.Identity()
        resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        normalised = torchvision.transforms.functional.normalize(resized, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        expected = reference(normalised)
    assert features.shape == (1, 2048) and features.dtype == torch.float32
    assert features.abs().mean() > 1e-2
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_pytorch_fid_weights_load_by_auto_detection(fid_weights):
    inception = load_inception(fid_weights, layout="auto")
    assert inception.layout == "pytorch-fid"
    assert type(inception.net.Mixed_7c) is FIDInceptionE_2
    inception.train()  # stays in eval mode: batch-norm statistics are part of the metric
    assert not inception.net.training
    images = _images(2, size=48)
    with torch.inference_mode():
        features = inception(images)
        # pytorch-fid's recipe: bilinear resize to 299, [0, 1] → [-1, 1]; torchvision's own
        # forward of the same network (its heads removed) gives the pool features
        resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        expected = inception.net(2 * resized - 1)
    assert features.shape == (2, 2048)
    assert torch.isfinite(features).all() and features.abs().mean() > 1e-2
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_layout_mismatch_and_bad_files(torchvision_weights, tmp_path):
    path, _ = torchvision_weights
    with pytest.raises(BundleError, match="holds torchvision Inception weights"):
        load_inception(path, layout="pytorch-fid")
    not_inception = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, not_inception)
    with pytest.raises(BundleError, match="not an Inception-v3"):
        load_inception(not_inception)


def test_missing_weights_offline_name_the_file(hub_dir, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as error:
        load_inception(None)
    message = str(error.value)
    assert "\n" not in message and "offline" in message
    checkpoints = hub_dir / "checkpoints"
    assert str(checkpoints / PYTORCH_FID_FILE) in message
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in message
    assert "--inception=/path/to/" in message
    with pytest.raises(MissingWeightsError, match=TORCHVISION_FILE) as error:
        load_inception(None, layout="torchvision")
    assert PYTORCH_FID_FILE not in str(error.value)
    with pytest.raises(MissingWeightsError, match="do not exist"):
        load_inception(hub_dir / "nowhere.pth")


def test_default_location_is_searched(hub_dir, fid_weights):
    checkpoints = hub_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / PYTORCH_FID_FILE).symlink_to(fid_weights)
    assert load_inception(None).layout == "pytorch-fid"


# --- folders -----------------------------------------------------------------------------------


def _write_images(folder, images: torch.Tensor, suffixes=(".png",)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        suffix = suffixes[index % len(suffixes)]
        Image.fromarray(pixels).save(folder / f"{index:03d}{suffix}", quality=100, lossless=True)


class _MeanColour(nn.Module):
    """A cheap stand-in feature extractor: per-channel means and stds of the [0, 1] input."""

    def forward(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_extract_features_reads_folders_recursively(tmp_path):
    images = _images(3, size=32)
    _write_images(tmp_path / "a", images[:2])
    _write_images(tmp_path / "a" / "nested", images[2:], suffixes=(".webp",))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    Image.new("L", (40, 24), color=128).save(tmp_path / "a" / "zz_gray.jpg")  # other size, greyscale
    paths = list_images(tmp_path / "a")
    assert [p.name for p in paths] == ["000.png", "001.png", "000.webp", "zz_gray.jpg"]
    features = extract_features(paths, _MeanColour(), batch_size=3)
    assert features.shape == (4, 6)
    expected = torch.cat([images.mean(dim=(2, 3)), torch.full((1, 3), 128 / 255)])
    torch.testing.assert_close(features[:, :3], expected, atol=2e-3, rtol=0)


def test_compute_fid_kid_on_tiny_folders(tmp_path):
    _write_images(tmp_path / "real", _images(4, size=32, seed=1))
    _write_images(tmp_path / "fake", _images(5, size=40, seed=2), suffixes=(".png", ".jpg"))
    result = compute_fid_kid(tmp_path / "real", tmp_path / "fake", _MeanColour(), batch_size=2, kid_subsets=10)
    assert set(result) == {"fid", "kid_mean", "kid_std", "num_real", "num_fake"}
    assert (result["num_real"], result["num_fake"]) == (4, 5)
    assert all(np.isfinite(result[key]) for key in ("fid", "kid_mean", "kid_std"))
    assert result["fid"] > 0 and result["kid_std"] > 0
    same = compute_fid_kid(tmp_path / "real", tmp_path / "real", _MeanColour(), batch_size=3)
    assert abs(same["fid"]) < 1e-9


@pytest.mark.slow
def test_compute_fid_kid_with_inception(tmp_path, fid_weights):
    _write_images(tmp_path / "real", _images(2, size=32, seed=1))
    _write_images(tmp_path / "fake", _images(2, size=40, seed=2), suffixes=(".png", ".jpg"))
    result = compute_fid_kid(tmp_path / "real", tmp_path / "fake", load_inception(fid_weights), batch_size=2, device="cpu")
    assert (result["num_real"], result["num_fake"]) == (2, 2)
    assert all(np.isfinite(result[key]) for key in ("fid", "kid_mean", "kid_std"))
    assert result["fid"] > 0


@pytest.mark.slow
def test_features_ignore_autocast_and_memory_format(fid_weights):
    inception = load_inception(fid_weights)
    images = _images(1, size=32)
    with torch.inference_mode():
        expected = inception(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = inception.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_compute_fid_kid_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    _write_images(tmp_path / "real", _images(2, size=16))
    with pytest.raises(DataError, match="has 0 images"):
        compute_fid_kid(tmp_path / "real", tmp_path / "empty", _MeanColour(), batch_size=2)
    with pytest.raises(UsageError, match="does not exist"):
        compute_fid_kid(tmp_path / "missing", tmp_path / "real", _MeanColour(), batch_size=2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        compute_fid_kid(tmp_path / "real", tmp_path / "broken", _MeanColour(), batch_size=2)


def test_inception_features_use_true_float32_kernels():
    """TF32 convolutions on a GPU would move FID away from pytorch-fid's; the forward turns it off
    and restores the caller's settings."""
    from ldm_cli.eval.inception import InceptionFeatures

    net = fid_inception_v3()
    seen = []
    net.Conv2d_1a_3x3.register_forward_pre_hook(
        lambda module, args: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
    )
    features = InceptionFeatures(net, "pytorch-fid")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.no_grad():
            features(torch.rand(1, 3, 75, 75))
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
