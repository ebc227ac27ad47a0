"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as used by taming-transformers / LDM).

Each output logit judges one overlapping patch of the image as real or reconstructed.
Layer layout and the `main.<i>` names follow the original, so LDM discriminator weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    base_channels: int = 64
    num_layers: int = 3


class PatchDiscriminator(nn.Module):
    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        width = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        in_width = width
        for n in range(1, config.num_layers + 1):
            out_width = width * min(2**n, 8)
            stride = 2 if n < config.num_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                # no bias: BatchNorm's shift makes it redundant
                nn.Conv2d(in_width, out_width, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            in_width = out_width
        layers.append(nn.Conv2d(in_width, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, C, H, W] -> real/fake logits [B, 1, h, w]."""
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation, as in pix2pix
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
