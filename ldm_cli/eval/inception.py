"""Inception-v3 pool features (2048-d) for FID/KID, from either of two weight files.

- "pytorch-fid": `pt_inception-2015-12-05-6726825d.pth`, the TensorFlow graph that the
  original FID code used, ported by pytorch-fid. Its graph differs from torchvision's
  Inception-v3 in a few pooling layers (see the FID* blocks below) and has 1008 classes.
  FID numbers comparable with published ones need this file.
- "torchvision": `inception_v3_google-0cc3c7bd.pth`, torchvision's ImageNet classifier.

Without a path, the file is taken from `torch.hub.get_dir()/checkpoints/` or downloaded there
(ldm_cli/weights.py): pytorch-fid's by default, torchvision's when that layout is asked for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionAux,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from ldm_cli.errors import BundleError, MissingWeightsError
from ldm_cli.weights import Resolved, WeightFile, fetch, locate

Layout = Literal["torchvision", "pytorch-fid"]

INCEPTION_INPUT_SIZE = 299
FEATURE_DIM = 2048

# file name and where it comes from, per layout; "auto" prefers the FID weights
WEIGHT_FILES: dict[str, tuple[str, str]] = {
    "pytorch-fid": (
        "pt_inception-2015-12-05-6726825d.pth",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    ),
    "torchvision": (
        "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    ),
}
NUM_CLASSES = {"pytorch-fid": 1008, "torchvision": 1000}
WEIGHTS_OPTION = "--inception"
# pytorch-fid publishes no digest and its file name's hex part is not the file's sha256 prefix:
# that file is checked by its layout (1008 classes, every key) when it loads
WEIGHT_SOURCES: dict[str, WeightFile] = {
    "pytorch-fid": WeightFile("Inception-v3 (pytorch-fid FID weights)", *WEIGHT_FILES["pytorch-fid"], WEIGHTS_OPTION, verify_prefix=False),
    "torchvision": WeightFile("Inception-v3 (torchvision ImageNet weights)", *WEIGHT_FILES["torchvision"], WEIGHTS_OPTION),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- the TensorFlow FID graph, as variants of torchvision's blocks ---------------------------
# TF's 'SAME' average pooling divides by the number of real pixels under the window, i.e.
# count_include_pad=False; torchvision's blocks count the zero padding. Only the pool
# branch changes, so each variant re-states its block's branches with that one pool swapped.


def _average_pool_real_pixels(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    def _forward(self, x: Tensor) -> list[Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_average_pool_real_pixels(x)),
        ]


class FIDInceptionC(InceptionC):
    def _forward(self, x: Tensor) -> list[Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_average_pool_real_pixels(x))]


class FIDInceptionE_1(InceptionE):
    """Mixed_7b of the FID graph: average pool over real pixels only."""

    @staticmethod
    def _pool(x: Tensor) -> Tensor:
        return _average_pool_real_pixels(x)

    def _forward(self, x: Tensor) -> list[Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self._pool(x))]


class FIDInceptionE_2(FIDInceptionE_1):
    """Mixed_7c of the FID graph: the TF graph has a max pool here (a quirk kept for comparability)."""

    @staticmethod
    def _pool(x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def fid_inception_v3() -> Inception3:
    """The pytorch-fid network with random weights; its state_dict has the FID file's keys."""
    blocks = [BasicConv2d, FIDInceptionA, InceptionB, FIDInceptionC, InceptionD, FIDInceptionE_1, InceptionAux]
    net = Inception3(num_classes=NUM_CLASSES["pytorch-fid"], aux_logits=False, init_weights=False, inception_blocks=blocks)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def torchvision_inception_v3() -> Inception3:
    """torchvision's ImageNet network with random weights, configured as its pretrained weights expect."""
    return Inception3(num_classes=NUM_CLASSES["torchvision"], aux_logits=True, transform_input=True, init_weights=False)


# --- feature extractor -----------------------------------------------------------------------


@contextlib.contextmanager
def float32_kernels() -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and cuBLAS matrix products; the settings come back after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionFeatures(nn.Module):
    """Images `[B, 3, H, W]` in [0, 1] (any size) → pool3 features `[B, 2048]` (float32)."""

    def __init__(self, net: Inception3, layout: Layout):
        super().__init__()
        if layout not in NUM_CLASSES:
            raise ValueError(f"unknown Inception layout {layout!r}")
        self.layout = layout
        # only the convolutional trunk is used; the classifier heads would just hold memory
        net.fc = nn.Identity()
        net.AuxLogits = None
        self.net = net.eval().requires_grad_(False)
        if layout == "pytorch-fid":
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # [0, 1] → [-1, 1]
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        # batch-norm statistics are part of the metric: the network stays in eval mode
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        # features are compared across runs and with pytorch-fid, so they are always computed in
        # float32: no autocast, and no TF32 in cuDNN's convolutions or cuBLAS's products on a GPU
        with torch.autocast(device_type=images.device.type, enabled=False), float32_kernels():
            x = images.float()
            if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
                x = F.interpolate(x, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False)
            x = (x - self.input_mean) / self.input_std
            if self.net.transform_input:
                # torchvision's pretrained weights map ImageNet-normalised input back to the
                # [-1, 1] scale of the Google graph; this is torchvision's own step
                x = self.net._transform_input(x)
            return self._pool_features(x)

    def _pool_features(self, x: Tensor) -> Tensor:
        net = self.net
        trunk = [
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d,
            net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e,
            net.Mixed_7a, net.Mixed_7b, net.Mixed_7c,
        ]  # fmt: skip
        for layer in trunk:
            x = layer(x)
        return torch.flatten(net.avgpool(x), 1)


# --- weight loading --------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BundleError(f"cannot read Inception weights {path}: {type(error).__name__}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BundleError(f"{path} does not hold an Inception state_dict (found {type(state).__name__})")
    return state


def detect_layout(state_dict: dict[str, Tensor]) -> Layout:
    """Which network a state_dict belongs to: the FID graph has 1008 classes, torchvision 1000."""
    fc_weight = state_dict.get("fc.weight")
    num_classes = None if fc_weight is None else fc_weight.shape[0]
    for layout, expected in NUM_CLASSES.items():
        if num_classes == expected:
            return layout  # type: ignore[return-value]
    raise BundleError(
        f"not an Inception-v3 state_dict (fc.weight has {num_classes} classes, "
        "expected 1008 for pytorch-fid or 1000 for torchvision)"
    )


def _default_source(layout: str) -> WeightFile:
    """The file of `layout` ("auto": a cached one of either, else the FID weights)."""
    candidates = [WEIGHT_SOURCES[name] for name in (WEIGHT_SOURCES if layout == "auto" else [layout])]
    cached = [spec for spec in candidates if locate(spec).origin == "cache"]
    return (cached or candidates)[0]


def inception_source(path: str | os.PathLike | None = None, layout: str = "auto") -> Resolved:
    """Where the weights will come from, without fetching: a path, a cached file, or a download."""
    return locate(WEIGHT_SOURCES["pytorch-fid"], path) if path is not None else locate(_default_source(layout))


def load_inception(
    path: str | os.PathLike | None = None, layout: Literal["auto", "torchvision", "pytorch-fid"] = "auto"
) -> InceptionFeatures:
    """Build the feature extractor from a weight file (`.pth` or `.safetensors`), on CPU.

    path None takes the file of `layout` from `torch.hub.get_dir()/checkpoints/`, downloading it
    when missing (unless offline); "auto" takes the layout from the state_dict and prefers the
    pytorch-fid file.
    """
    if layout not in ("auto", *WEIGHT_FILES):
        raise ValueError(f"layout must be 'auto', 'torchvision' or 'pytorch-fid', got {layout!r}")
    if path is None:
        weights_path = fetch(_default_source(layout))
    else:
        weights_path = Path(path).expanduser()
        if not weights_path.is_file():
            sources = " or ".join(url for _, url in WEIGHT_FILES.values())
            raise MissingWeightsError(
                f"Inception weights {weights_path} do not exist; get {sources} and pass its path with {WEIGHTS_OPTION} PATH"
            )
    state_dict = _read_state_dict(weights_path)
    found_layout = detect_layout(state_dict)
    if layout != "auto" and layout != found_layout:
        raise BundleError(f"{weights_path} holds {found_layout} Inception weights, but layout {layout!r} was asked for")

    net = fid_inception_v3() if found_layout == "pytorch-fid" else torchvision_inception_v3()
    try:
        result = net.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        details = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise BundleError(f"{weights_path} does not fit the {found_layout} Inception-v3: {details}") from error
    # a batch-norm step counter is training bookkeeping, never read in eval mode
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise BundleError(
            f"{weights_path} does not fit the {found_layout} Inception-v3: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    return InceptionFeatures(net, found_layout)
