"""LPIPS perceptual distance (Zhang et al. 2018), 'vgg' variant, v0.1 weights.

    d(x, y) = sum_l  mean_hw  || w_l * (f_l(x) - f_l(y)) ||^2,  f_l = unit-normalised VGG16 features

Layers l: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. The VGG16 ImageNet weights come from an
explicit path, torch hub's checkpoint cache, or torchvision's URL (verified, see ldm_cli/weights.py);
the linear heads from an explicit path, the `lpips` package's wheel, the cache, or their URL.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ldm_cli.errors import BundleError
from ldm_cli.weights import Resolved, WeightFile, cache_dir, fetch, locate, package_file, sha256_of

# torchvision's VGG16 `features` layout (cfg "D"); "M" is a 2x2 max-pool
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# indices (in `features`) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
DISABLE_HINT = ", or disable the term with loss.perceptual_weight=0"
# torchvision's VGG16_Weights.IMAGENET1K_V1.url, written out: importing torchvision costs seconds at start-up
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = WeightFile(
    title="VGG16 (LPIPS backbone)",
    filename=VGG16_URL.rsplit("/", 1)[-1],
    url=VGG16_URL,
    setting="loss.lpips_vgg_path",
    alternative=DISABLE_HINT,
)
HEADS_FILE = WeightFile(
    title="LPIPS vgg v0.1 heads",
    filename="lpips_vgg_v0.1.pth",
    url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
    setting="loss.lpips_heads_path",
    sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    alternative=DISABLE_HINT,
)
HEADS_IN_PACKAGE = ("lpips", "weights/v0.1/vgg.pth")  # the `lpips` wheel ships the heads (7 KB)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for spec in _VGG16_LAYOUT:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, spec, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = spec
    return nn.Sequential(*layers)  # ends at relu5_3: the last pool is never used


class LinearHead(nn.Module):
    """Learned per-channel weights of one layer (1x1 conv, no bias); key `model.1.weight` as upstream."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-vgg; inputs in [-1, 1], output one distance per sample, shape [B]."""

    def __init__(self):
        super().__init__()
        # LPIPS' own input scaling (ImageNet statistics expressed for [-1, 1] inputs)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        for k, channels in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{k}", LinearHead(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # always eval: the heads' Dropout must stay off even inside a module put in train mode
        return super().train(False)

    def heads(self) -> list[LinearHead]:
        return [getattr(self, f"lin{k}") for k in range(len(TAP_CHANNELS))]

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAP_INDICES:
                taps.append(x)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        scaled = (torch.cat([x, y]) - self.shift) / self.scale  # one VGG pass for both images
        distance = torch.zeros(batch, device=x.device, dtype=torch.float32)
        for head, tap in zip(self.heads(), self._taps(scaled)):
            # normalise and weight in float32: channel sums of squares lose too much in bf16
            tap = tap.float()
            diff = (_unit_normalize(tap[:batch]) - _unit_normalize(tap[batch:])).pow(2)
            channel_weight = head.model[1].weight.float()  # [1, C, 1, 1]: the 1x1 conv, no bias
            distance = distance + (channel_weight * diff).sum(dim=1).mean(dim=[1, 2])
        return distance


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickle with code, ...
        raise BundleError(f"cannot read weights from {path}: {error}") from error
    if not isinstance(state, dict):
        raise BundleError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    return state


def vgg16_cache_path() -> Path:
    """Where torchvision keeps VGG16_Weights.IMAGENET1K_V1 once downloaded."""
    return cache_dir() / VGG16_FILE.filename


def heads_cache_path() -> Path:
    return cache_dir() / HEADS_FILE.filename


def _packaged_heads(heads_file: WeightFile) -> Path | None:
    """The `lpips` package's heads, when installed and identical to the published file."""
    path = package_file(*HEADS_IN_PACKAGE)
    if path is None or (heads_file.sha256 and sha256_of(path) != heads_file.sha256):
        return None
    return path


def lpips_sources(
    vgg_path: str | None = None, heads_path: str | None = None, vgg_source: WeightFile = VGG16_FILE,
    heads_source: WeightFile = HEADS_FILE,
) -> list[tuple[str, Resolved]]:
    """(title, where from) of both files, without fetching: for `--show-config` and start-up lines."""
    packaged = _packaged_heads(heads_source) if heads_path is None else None
    heads = Resolved(packaged, "package") if packaged else locate(heads_source, heads_path)
    return [(vgg_source.title, locate(vgg_source, vgg_path)), (heads_source.title, heads)]


def _layer_index(key: str) -> int:
    index = key.split(".")[1]
    return int(index) if index.isdigit() else -1


def load_lpips(
    vgg_path: str | None = None, heads_path: str | None = None, vgg_source: WeightFile = VGG16_FILE,
    heads_source: WeightFile = HEADS_FILE,
) -> LPIPS:
    """Build LPIPS-vgg; a weight file missing from every local place is downloaded unless offline."""
    vgg_file = str(fetch(vgg_source, vgg_path))
    packaged = _packaged_heads(heads_source) if heads_path is None else None
    heads_file = str(packaged or fetch(heads_source, heads_path))
    model = LPIPS()

    vgg_state = _read_state_dict(vgg_file)
    # torchvision layout: keep `features.<i>.*` up to relu5_3, ignore the pool and the classifier
    features = {
        key.removeprefix("features."): value
        for key, value in vgg_state.items()
        if key.startswith("features.") and _layer_index(key) < len(model.features)
    }
    try:
        model.features.load_state_dict(features, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{vgg_file} is not a torchvision VGG16 state_dict: {error}".replace("\n", " ")) from error

    heads_state = {k: v for k, v in _read_state_dict(heads_file).items() if k.startswith("lin")}
    heads = nn.ModuleDict({f"lin{k}": head for k, head in enumerate(model.heads())})
    try:
        heads.load_state_dict(heads_state, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{heads_file} is not an LPIPS vgg v0.1 heads file: {error}".replace("\n", " ")) from error
    return model
