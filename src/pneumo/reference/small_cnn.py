"""pneumo's production architecture (pneumo.model.network.SmallCNN) in NumPy, with the same parameter names."""

from __future__ import annotations

import numpy as np

from pneumo.reference.layers import (
    BatchNorm2d,
    Container,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)


class SmallCNN(Container):
    """features: one Conv2d(3x3)-BatchNorm2d-ReLU-MaxPool2d(2) block per channel count; head: global
    average pooling, flatten, dropout, linear to one logit. Input (N, 1, H, W) in [0, 1]."""

    def __init__(
        self,
        channels,
        stem_stride=2,
        dropout=0.0,
        input_mean=0.5,
        input_std=0.25,
        per_image="none",
        dtype=np.float64,
        rng=None,
    ):
        rng = rng or np.random.default_rng()
        self.input_mean, self.input_std, self.per_image = input_mean, input_std, per_image
        blocks, c_in = [], 1
        for i, c_out in enumerate(channels):
            blocks += [
                Conv2d(
                    c_in, c_out, 3, stride=stem_stride if i == 0 else 1, padding=1, bias=False, dtype=dtype, rng=rng
                ),
                BatchNorm2d(c_out, dtype=dtype),
                ReLU(),
                MaxPool2d(2),
            ]
            c_in = c_out
        self.features = Sequential(*blocks)
        self.head = Sequential(
            GlobalAvgPool2d(), Flatten(), Dropout(dropout, rng=rng), Linear(c_in, 1, dtype=dtype, rng=rng)
        )

    def children(self):
        return [("features", self.features), ("head", self.head)]

    def forward(self, x):
        if self.per_image == "standardize":
            mean, std = x.mean((-2, -1), keepdims=True), x.std((-2, -1), ddof=1, keepdims=True)
            x = (x - mean) / (std / self.input_std + 1e-3) + self.input_mean
        elif self.per_image == "equalize":
            x = equalize(x)
        x = (x - self.input_mean) / self.input_std
        return self.head.forward(self.features.forward(x))[:, 0]

    def backward(self, dlogits):
        """The gradient with respect to the image after its per-image step (which is data preparation,
        not a layer: equalization has no useful gradient), that is, the input itself by default."""
        dx = self.features.backward(self.head.backward(dlogits[:, None]))
        return dx / self.input_std


def equalize(x, levels=256):
    """Histogram equalization to mid-ranks, as pneumo.model.network.equalize: each pixel becomes the
    share of its image's pixels darker than it plus half of those at its grey level."""
    flat = np.clip(np.rint(x.reshape(len(x), -1) * (levels - 1)), 0, levels - 1).astype(np.int64)
    counts = np.stack([np.bincount(row, minlength=levels) for row in flat]).astype(x.dtype)
    mid_rank = (counts.cumsum(1) - counts / 2) / flat.shape[1]
    return np.take_along_axis(mid_rank, flat, 1).reshape(x.shape)
