"""Which kernel runs a SmallCNN block on the CPU: the one seam between the model and the kernels."""

from __future__ import annotations

import torch
from torch import nn

from pneumo.cpu import fused, use_kernels, winograd


def block(x: torch.Tensor, conv: nn.Module, bn: nn.Module, relu: nn.Module, pool: nn.Module) -> torch.Tensor | None:
    """relu(pool(bn(conv(x)))) by the kernels where they cover this block, else None."""
    if use_kernels("fused") and fused.covers_stem(x, conv, bn, pool):
        return fused.stem_block(x, conv, bn)
    if use_kernels("fused") and fused.covers_inference_stem(x, conv, bn, pool):
        return fused.inference_stem(x, conv)
    if use_kernels("winograd") and winograd.covers(x, conv, bn, pool):
        return winograd.conv_pool_relu(x, conv)
    fast_conv = use_kernels("winograd") and winograd.covers_conv(x, conv)
    fast_rest = use_kernels("fused") and fused.covers_after(x, conv, bn, pool)
    if not (fast_conv or fast_rest):
        return None
    y = winograd.conv3x3(x, conv) if fast_conv else conv(x)
    return fused.bn_pool_relu(y, bn) if fast_rest else relu(pool(bn(y)))


def warm_up() -> None:
    """Load (on the first run after installing: compile) the kernels now, before timed work starts."""
    if use_kernels("fused"):
        fused.kernels()
    if use_kernels("winograd"):
        winograd.kernels()
