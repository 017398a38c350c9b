"""The classifier: a small CNN that maps a 1-channel X-ray in [0, 1] to one pneumonia logit."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from pneumo.core.config import ModelConfig
from pneumo.cpu.dispatch import block as cpu_block

# Input normalization is part of the model, so that every backend (torch, NumPy, exports) agrees.
INPUT_MEAN, INPUT_STD = 0.5, 0.25
LEVELS = 256  # the grey levels of an 8-bit image, which is what every decoded X-ray becomes


def normalize(x: torch.Tensor, per_image: str = "none") -> torch.Tensor:
    """x (N, 1, H, W) in [0, 1] to the network's input. `per_image` first removes each image's own
    exposure, which differs between sites: "standardize" maps it to mean 0.5 and standard deviation
    0.25; "equalize" replaces each grey level by its rank among the image's pixels (histogram
    equalization), so that any monotone change of the grey levels leaves the input as it was."""
    if per_image == "standardize":
        mean, std = x.mean((-2, -1), keepdim=True), x.std((-2, -1), keepdim=True)
        x = (x - mean) / (std / INPUT_STD + 1e-3) + INPUT_MEAN  # a blank image stays blank
    elif per_image == "equalize":
        x = equalize(x)
    return (x - INPUT_MEAN) / INPUT_STD


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's mid-rank among its image's 256 grey levels: the share of the image's pixels darker
    than it plus half of those as dark. A uniform image becomes 0.5, and the result is in [0, 1].
    Written with scatter-add, cumsum and gather, which traced and exported graphs keep."""
    levels = (x.flatten(1) * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()
    ones = torch.ones_like(levels, dtype=x.dtype)
    counts = x.new_zeros(x.shape[0], LEVELS).scatter_add(1, levels, ones)  # shape[0]: traced, unlike len
    mid_rank = (counts.cumsum(1) - counts / 2) / levels.shape[1]
    return mid_rank.gather(1, levels).view_as(x)


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU-maxpool blocks, global average pooling, dropout, one linear logit.

    The first convolution may stride (`stem_stride`) so that 224x224 inputs stay affordable on a CPU.
    """

    def __init__(self, channels: list[int], stem_stride: int = 2, dropout: float = 0.1, per_image: str = "none"):
        super().__init__()
        self.per_image = per_image
        blocks, c_in = [], 1
        for i, c_out in enumerate(channels):
            stride = stem_stride if i == 0 else 1
            blocks += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                MaxPool2x2(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(normalize(x, self.per_image))

    def logit(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The logit for an input already normalized (an ensemble normalizes once for all its members);
        `features` collects each block's output averaged over space (the applicability check's). Pooling
        comes before the ReLU: the two commute, and the ReLU then touches a quarter of the values."""
        for conv, bn, relu, pool in self.blocks():
            fast = cpu_block(x, conv, bn, relu, pool)
            x = relu(pool(bn(conv(x)))) if fast is None else fast
            if features is not None:
                features.append(x.mean((2, 3)))
        return self.head(x).squeeze(1)

    def blocks(self) -> Iterator[tuple[nn.Module, nn.Module, nn.Module, nn.Module]]:
        """(conv, bn, relu, pool) of each block, in order."""
        for i in range(0, len(self.features), 4):
            yield tuple(self.features[i : i + 4])

    @torch.no_grad()
    def folded(self) -> SmallCNN:
        """A copy for inference in which each BatchNorm (with its running statistics) is folded into the
        convolution before it: the same outputs up to rounding, one pass over the activations less per
        block. Only for evaluation mode: the copy has no BatchNorm left to train."""
        out = copy.deepcopy(self).eval()
        for i in range(0, len(out.features), 4):
            conv, bn = out.features[i], out.features[i + 1]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
            )
            fused.weight.copy_(conv.weight * scale[:, None, None, None])
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
            out.features[i], out.features[i + 1] = fused, nn.Identity()
        return out

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.AdamW:
        """AdamW that decays only the conv and linear weights: decaying BatchNorm scales and biases
        only fights the normalization."""
        decay = [p for p in self.parameters() if p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # One fused kernel for all parameters instead of a dozen passes over them: it matters on a CPU,
        # where the optimizer's many small operations are a visible share of a step of this small network.
        one_kernel = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in self.parameters())
        return torch.optim.AdamW(groups, lr=lr, fused=one_kernel or None)

    def flops_per_image(self, size: int, training: bool = True) -> float:
        """Multiply-adds of the convolutions and the linear layer, 2 FLOPs each; training counts
        forward and backward (gradients of inputs and weights), 3x the forward."""
        macs, hw = 0, size
        for conv in (m for m in self.features if isinstance(m, nn.Conv2d)):
            hw = -(-hw // conv.stride[0])
            macs += hw * hw * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            hw //= 2  # the block's pooling
        macs += self.head[-1].in_features
        return (3 if training else 1) * 2 * macs


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2) which, without autograd, takes the maximum over row pairs, then over column pairs:
    the same values without writing the index of each maximum that max_pool2d keeps for a backward
    pass, which takes half of its time on the largest activations."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced and compiled graphs (exports, torch.compile) keep the one standard operator.
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # max_pool2d drops an odd last row or column
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class Classifier(nn.Module):
    """What a trained model runs: the mean logit of its members (one network, or an ensemble), with
    `tta` also over each image's mirror image, mapped by its calibration, scale * logit + bias. The
    sigmoid of that is the probability of pneumonia."""

    def __init__(self, members: list[SmallCNN], tta: bool = False, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.per_image = members[0].per_image  # one model config, so one input normalization for all
        self.tta = tta
        self.scale, self.bias = float(scale), float(bias)

    def forward(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Calibrated logits; `features`, when given, collects each member's pooled block outputs."""
        logit = self._mean_logit(x, features)
        if self.tta:
            logit = (logit + self._mean_logit(x.flip(-1))) / 2
        return logit * self.scale + self.bias

    def folded(self) -> Classifier:
        """The same classifier with each member's BatchNorm folded into its convolutions (inference only)."""
        return Classifier([m.folded() for m in self.members], self.tta, self.scale, self.bias).eval()

    def _mean_logit(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = normalize(x, self.per_image)
        logit = self.members[0].logit(x, features)
        for member in self.members[1:]:
            logit = logit + member.logit(x, features)
        return logit / len(self.members) if len(self.members) > 1 else logit


def build_model(cfg: ModelConfig) -> SmallCNN:
    return SmallCNN(cfg.channels, cfg.stem_stride, cfg.dropout, cfg.per_image)
