"""The classifier: a small CNN that maps a 1-channel X-ray in [0, 1] to one pneumonia logit."""

from __future__ import annotations

import torch
from torch import nn

from pneumo.config import ModelConfig

# Fixed input normalization, part of the model so that every backend (torch, NumPy, exports) agrees.
INPUT_MEAN, INPUT_STD = 0.5, 0.25


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU-maxpool blocks, global average pooling, dropout, one linear logit.

    The first convolution may stride (`stem_stride`) so that 224x224 inputs stay affordable on a CPU.
    """

    def __init__(self, channels: list[int], stem_stride: int = 2, dropout: float = 0.1):
        super().__init__()
        blocks, c_in = [], 1
        for i, c_out in enumerate(channels):
            stride = stem_stride if i == 0 else 1
            blocks += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - INPUT_MEAN) / INPUT_STD)).squeeze(1)


def build_model(cfg: ModelConfig) -> SmallCNN:
    return SmallCNN(cfg.channels, cfg.stem_stride, cfg.dropout)
