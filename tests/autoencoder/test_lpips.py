"""LPIPS-vgg: file loading (explicit paths, hub cache, clear errors) and the distance itself."""

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from ldm_cli.autoencoder.lpips import (
    HEADS_IN_PACKAGE,
    LPIPS,
    heads_cache_path,
    load_lpips,
    lpips_sources,
    vgg16_cache_path,
)
from ldm_cli.errors import BundleError, MissingWeightsError
from ldm_cli.weights import package_file

CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture(scope="module")
def vgg_features():
    torch.manual_seed(0)
    # the features part of torchvision.models.vgg16 (skips building the 120M-param classifier)
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()


@pytest.fixture(scope="module")
def weight_files(vgg_features, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips_weights")
    # torchvision's layout; a classifier key too, which the loader must ignore
    vgg_state = {f"features.{k}": v for k, v in vgg_features.state_dict().items()}
    vgg_state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(vgg_state, folder / "vgg16.pth")
    save_file(vgg_state, str(folder / "vgg16.safetensors"))
    # the official heads are non-negative; random ones of the same layout
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    torch.save(heads, folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg16.safetensors", folder / "vgg.pth", heads


@pytest.fixture(scope="module")
def lpips(weight_files):
    vgg_path, _, heads_path, _ = weight_files
    return load_lpips(str(vgg_path), str(heads_path))


def _reference_lpips(features, heads, x, y):
    """Straight from the paper: official slices of torchvision's VGG16, heads as 1x1 convs."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    h_x, h_y = (x - shift) / scale, (y - shift) / scale
    total = 0.0
    for k, (start, stop) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]):
        h_x, h_y = features[start:stop](h_x), features[start:stop](h_y)
        n_x = h_x / (torch.sqrt(torch.sum(h_x**2, dim=1, keepdim=True)) + 1e-10)
        n_y = h_y / (torch.sqrt(torch.sum(h_y**2, dim=1, keepdim=True)) + 1e-10)
        total = total + F.conv2d((n_x - n_y) ** 2, heads[f"lin{k}.model.1.weight"]).mean(dim=[2, 3], keepdim=True)
    return total.flatten()


def test_distance_properties_and_reference(lpips, vgg_features, weight_files):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        d_xy, d_yx, d_xx = lpips(x, y), lpips(y, x), lpips(x, x)
        expected = _reference_lpips(vgg_features, weight_files[3], x, y)
    assert d_xy.shape == (2,)
    assert torch.all(d_xx == 0)
    assert torch.all(d_xy > 0)
    torch.testing.assert_close(d_xy, d_yx)
    torch.testing.assert_close(d_xy, expected, atol=1e-5, rtol=1e-5)
    # a bigger perturbation is further away
    with torch.no_grad():
        assert torch.all(lpips(x, (x + 1.0 * torch.randn_like(x)).clamp(-1, 1)) > d_xy)


def test_frozen_eval_and_gradients_reach_the_input(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    lpips(x, torch.zeros(1, 3, 16, 16)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_safetensors_vgg_loads_the_same(weight_files, lpips):
    _, safetensors_path, heads_path, _ = weight_files
    other = load_lpips(str(safetensors_path), str(heads_path))
    for (name, a), b in zip(lpips.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_vgg_offline_names_the_file_and_the_way_out(hub_dir, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "1")
    expected = hub_dir / "checkpoints" / "vgg16-397923af.pth"
    assert vgg16_cache_path() == expected
    with pytest.raises(MissingWeightsError) as error:
        load_lpips()
    message = str(error.value)
    assert "\n" not in message
    assert str(expected) in message and "offline" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "loss.lpips_vgg_path=" in message and "loss.perceptual_weight=0" in message


def test_heads_come_from_the_installed_lpips_package(hub_dir, weight_files, monkeypatch):
    monkeypatch.setenv("LDM_OFFLINE", "1")
    vgg_path, _, _, _ = weight_files
    vgg16_cache_path().parent.mkdir(parents=True)
    os.symlink(vgg_path, vgg16_cache_path())
    model = load_lpips()  # offline: the VGG16 from the cache, the heads from the lpips wheel
    packaged = torch.load(package_file(*HEADS_IN_PACKAGE), map_location="cpu", weights_only=True)
    assert set(packaged) == {f"lin{k}.model.1.weight" for k in range(5)}
    for k, head in enumerate(model.heads()):
        assert torch.equal(head.model[1].weight, packaged[f"lin{k}.model.1.weight"])
    (vgg_title, vgg_where), (heads_title, heads_where) = lpips_sources()
    assert (vgg_where.origin, vgg_where.path) == ("cache", vgg16_cache_path())
    assert heads_where.origin == "package" and heads_where.path.name == "vgg.pth"
    assert not heads_cache_path().exists()  # nothing was fetched


def test_explicit_bad_paths(tmp_path, weight_files):
    _, _, heads_path, _ = weight_files
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        load_lpips(str(tmp_path / "nowhere.pth"), str(heads_path))
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(BundleError, match="wrong.pth"):
        load_lpips(str(tmp_path / "wrong.pth"), str(heads_path))
