"""SmallCNN's 3x3 convolutions at inference on the CPU by Winograd's F(4x4, 3x3), each with the bias, the
2x2 max-pool and the ReLU after it.

A direct 3x3 convolution makes 9 products per output and input channel. F(4x4, 3x3) computes a 4x4
tile of outputs from a 6x6 tile of inputs with 36 products per channel pair instead of 16 x 9 = 144,
at the price of two cheap linear transforms (see `pneumo.winograd_kernels`). The products are 36
matrix products that torch runs (its BLAS); the transforms are numba kernels, which also pool and
apply the ReLU, so the full-resolution output is never written. Images go through a chunk at a time,
so that the transformed tiles stay in the cache from one step to the next.

What it covers: inference (no autograd) on the CPU in float32 of a folded network (BatchNorm folded
into a convolution with a bias, `SmallCNN.folded`), 3x3 convolutions with stride 1 and padding 1
followed by a 2x2 max-pool, outside tracing and compiling (exports keep the standard operators).
Everything else, the first block's strided one-channel convolution included, runs torch's operators.
The results are the direct convolution's up to rounding (tests/test_winograd.py).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

from pneumo.kernels import load, nhwc, plain_2x2, set_threads

# False runs torch's operators everywhere (to compare the two).
ENABLED = True
# The transformed tiles and products of a chunk of images, at most this many bytes: they then stay in
# the cache between the transform, the matrix products and the transform back.
CHUNK_BYTES = 2 << 20
# G, which transforms a 3x3 kernel g into the 6x6 tile G g G^T that multiplies the input's tiles.
G = np.array([[6, 0, 0], [-4, -4, -4], [-4, 4, -4], [1, 2, 4], [1, -2, 4], [0, 0, 24]]) / 24

_transformed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def covers(x: torch.Tensor, conv: nn.Module, bn: nn.Module, pool: nn.Module) -> bool:
    """Whether relu(pool(bn(conv(x)))) can run as `conv_pool_relu` (see the module's docstring)."""
    if not ENABLED or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    if type(conv) is not nn.Conv2d or geometry != ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros") or conv.bias is None:
        return False
    if type(bn) is not nn.Identity or type(pool) is not nn.MaxPool2d:
        return False
    if not plain_2x2(pool):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or x.dim() != 4 or x.shape[0] == 0 or min(x.shape[-2:]) < 2:
        return False
    return kernels() is not None


def kernels():
    """The numba kernels, or None where they cannot run well (`pneumo.kernels.load`)."""
    return load("pneumo.winograd_kernels", "inference on the CPU runs Winograd's convolutions")


def conv_pool_relu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """relu(maxpool2x2(conv(x))), channels_last, for an input and a convolution that `covers` accepts."""
    n, c, h, w = x.shape
    tiles_h, tiles_w = -(-h // 4), -(-w // 4)
    out = torch.empty(n, conv.out_channels, h // 2, w // 2, memory_format=torch.channels_last)
    source, target = nhwc(x.contiguous(memory_format=torch.channels_last)), nhwc(out)
    u, bias = transformed_weight(conv), conv.bias.detach().contiguous().numpy()
    k = kernels()
    set_threads()
    per_image = 36 * tiles_h * tiles_w * (c + conv.out_channels) * 4
    step = max(1, CHUNK_BYTES // per_image)
    for s in range(0, n, step):
        e = min(n, s + step)
        tiles = torch.empty(36, (e - s) * tiles_h * tiles_w, c)
        k.input_tiles(source[s:e], tiles_h, tiles_w, tiles.numpy())
        k.output_pool_relu(torch.bmm(tiles, u).numpy(), bias, tiles_h, tiles_w, target[s:e])
    return out


def transformed_weight(conv: nn.Conv2d) -> torch.Tensor:
    """U (36, C, K): the 6x6 tile G g G^T of each kernel g, for the input channel C and output channel
    K, computed in float64. Kept with the module until its weight changes."""
    weight = conv.weight.detach()
    # A weight made under inference_mode has no version counter to tell a change by: not kept.
    stamp = None if weight.is_inference() else (weight.data_ptr(), weight._version)
    kept = _transformed.get(conv)
    if stamp is None or kept is None or kept[0] != stamp:
        g = torch.from_numpy(G)
        u = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)
        kept = (stamp, u.reshape(36, conv.in_channels, conv.out_channels).float().contiguous())
        if stamp is not None:
            _transformed[conv] = kept
    return kept[1]
