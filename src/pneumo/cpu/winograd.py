"""SmallCNN's 3x3 convolutions on the CPU by Winograd's F(4x4, 3x3): 36 products per 4x4 output tile and
channel pair instead of 144, as 36 matrix products that torch runs between two numba transforms
(`pneumo.cpu.winograd_kernels`), a cache-sized chunk of images at a time.

`conv_pool_relu`: a folded block at inference, bias, pool and ReLU applied by the transform back.
`conv3x3`: a convolution at full resolution (training), whose input gradient runs by Winograd too.
Only stride-1, padding-1 float32 convolutions outside autocast, tracing and compiling; results equal
the direct convolution up to rounding (tests/cpu/test_winograd.py). docs/performance.md, "Winograd".
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from pneumo.cpu.loader import eager_cpu_float32, load, nhwc, plain_2x2, set_threads

# The transformed tiles and products of a chunk of images, at most this many bytes: they then stay in
# the cache between the transform, the matrix products and the transform back.
CHUNK_BYTES = 2 << 20
# G, which transforms a 3x3 kernel g into the 6x6 tile G g G^T that multiplies the input's tiles.
G = np.array([[6, 0, 0], [-4, -4, -4], [-4, 4, -4], [1, 2, 4], [1, -2, 4], [0, 0, 24]]) / 24
_GG = torch.from_numpy(np.kron(G, G))

_transformed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def covers(x: torch.Tensor, conv: nn.Module, bn: nn.Module, pool: nn.Module) -> bool:
    """Whether relu(pool(bn(conv(x)))) can run as `conv_pool_relu` (see the module's docstring)."""
    if (
        torch.is_grad_enabled()
        or type(bn) is not nn.Identity
        or not isinstance(pool, nn.MaxPool2d)
        or not plain_2x2(pool)
    ):
        return False
    return _plain_3x3(x, conv) and conv.bias is not None and min(x.shape[-2:]) >= 2


def kernels():
    """The numba kernels, or None where they cannot run well (`pneumo.cpu.loader.load`)."""
    return load("pneumo.cpu.winograd_kernels", "3x3 convolutions on the CPU run by Winograd's F(4x4, 3x3)")


def conv_pool_relu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """relu(maxpool2x2(conv(x))), channels_last, for an input and a convolution that `covers` accepts."""
    n, _, h, w = x.shape
    out = torch.empty(n, conv.out_channels, h // 2, w // 2, memory_format=torch.channels_last)
    target, bias = nhwc(out), conv.bias.detach().contiguous().numpy()
    for s, e, tiles_h, tiles_w, products in _products(x, transformed_weight(conv)):
        kernels().output_pool_relu(products, bias, tiles_h, tiles_w, target[s:e])
    return out


def covers_conv(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether conv(x) can run as `conv3x3`: a convolution without bias (a training network's, BatchNorm
    after it), with or without autograd."""
    return _plain_3x3(x, conv) and conv.bias is None


def _plain_3x3(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether conv is a float32 3x3 convolution with stride 1 and padding 1, and x (N, C, H, W) a batch
    the kernels take (`eager_cpu_float32`), where they load."""
    if type(conv) is not nn.Conv2d or conv.weight.dtype != torch.float32:
        return False
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    if geometry != ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros"):
        return False
    if not eager_cpu_float32(x) or x.dim() != 4 or x.shape[0] == 0:
        return False
    return kernels() is not None


def conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x), channels_last, for an input and a convolution that `covers_conv` accepts, with gradients."""
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return _Conv3x3.apply(x, conv.weight)
    # Transformed afresh at every call: an optimizer's fused step changes the weight without
    # advancing the version counter that `transformed_weight` goes by.
    return _full(x, _transform(conv.weight.detach()))


class _Conv3x3(torch.autograd.Function):
    """(x, weight) -> conv(x). The input's gradient is itself a 3x3 convolution, of the output's
    gradient by the weight flipped in space with its channels swapped, so it runs by Winograd too; the
    weight's gradient is torch's."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _full(x, _transform(weight.detach()))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _full(grad, _transform(weight.detach().flip(2, 3).transpose(0, 1)))
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
            )[1]
        return grad_x, grad_w


def _full(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The convolution of x by the transformed weight u (36, C, K), channels_last, at full resolution."""
    n, _, h, w = x.shape
    out = torch.empty(n, u.shape[2], h, w, memory_format=torch.channels_last)
    target = nhwc(out)
    for s, e, tiles_h, tiles_w, products in _products(x, u):
        kernels().output_full(products, tiles_h, tiles_w, target[s:e])
    return out


def _products(x: torch.Tensor, u: torch.Tensor):
    """(first image, end, tiles_h, tiles_w, products (36, P, K) as NumPy) chunk by chunk: the transformed
    input tiles of images first to end times the transformed weight u (36, C, K)."""
    n, c, h, w = x.shape
    tiles_h, tiles_w = -(-h // 4), -(-w // 4)
    source = nhwc(x.detach().contiguous(memory_format=torch.channels_last))
    set_threads()
    per_image = 36 * tiles_h * tiles_w * (c + u.shape[2]) * 4
    step = max(1, CHUNK_BYTES // per_image)
    for s in range(0, n, step):
        e = min(n, s + step)
        tiles = torch.empty(36, (e - s) * tiles_h * tiles_w, c)
        kernels().input_tiles(source[s:e], tiles_h, tiles_w, tiles.numpy())
        yield s, e, tiles_h, tiles_w, torch.bmm(tiles, u).numpy()


def transformed_weight(conv: nn.Conv2d) -> torch.Tensor:
    """`_transform` of a folded module's weight, kept with the module until its weight changes (a folded
    network is not trained, so its weight changes only by an operation that advances its version)."""
    weight = conv.weight.detach()
    # A weight made under inference_mode has no version counter to tell a change by: not kept.
    stamp = None if weight.is_inference() else (weight.data_ptr(), weight._version)
    kept = _transformed.get(conv)
    if stamp is None or kept is None or kept[0] != stamp:
        kept = (stamp, _transform(weight))
        if stamp is not None:
            _transformed[conv] = kept
    return kept[1]


def _transform(weight: torch.Tensor) -> torch.Tensor:
    """U (36, C, K): the 6x6 tile G g G^T of each kernel g of weight (K, C, 3, 3), for the input channel C
    and output channel K, computed in float64 as one matrix product by the Kronecker product of G with
    itself, (G g G^T)[a, b] = sum over i, j of G[a, i] G[b, j] g[i, j]."""
    k, c = weight.shape[:2]
    u = _GG @ weight.detach().double().reshape(k * c, 9).T
    return u.reshape(36, k, c).transpose(1, 2).float().contiguous()
