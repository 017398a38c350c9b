"""SmallCNN's blocks with BatchNorm, 2x2 max-pool and ReLU fused, for training steps on the CPU (and the
first block at inference).

One pass over a convolution's output forward and one backward, where torch's modules make several:
pooling comes before BatchNorm's affine map (monotonic per channel: the maximum where the scale is
positive, the minimum where it is negative), and BatchNorm's statistics and gradient need only
per-channel sums. The first block's one-channel convolution is fused too, so its full-resolution output
never exists. Results equal torch's modules up to rounding, gradients and running statistics included
(tests/cpu/test_fused.py). Why and how: docs/performance.md, "Fused blocks".
"""

from __future__ import annotations

import torch
from torch import nn

from pneumo.cpu.loader import eager_cpu_float32, load, nhwc, plain_2x2, set_threads


def covers_stem(x: torch.Tensor, conv: nn.Module, bn: nn.Module, pool: nn.Module) -> bool:
    """Whether relu(pool(bn(conv(x)))) can run as `stem_block`: `covers` for a one-channel 3x3
    convolution with padding 1 and no bias, of an input that needs no gradient."""
    geometry = (conv.in_channels, conv.kernel_size, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    if type(conv) is not nn.Conv2d or geometry != (1, (3, 3), (1, 1), (1, 1), 1, "zeros") or conv.bias is not None:
        return False
    if conv.stride[0] != conv.stride[1] or x.requires_grad or x.dim() != 4:
        return False
    out_shape = (x.shape[0], conv.out_channels, *((size - 1) // conv.stride[0] + 1 for size in x.shape[-2:]))
    return _covers(torch.Size(out_shape), x, bn, pool)


def covers_inference_stem(x: torch.Tensor, conv: nn.Module, bn: nn.Module, pool: nn.Module) -> bool:
    """Whether relu(pool(bn(conv(x)))) can run as `inference_stem`: without autograd, on the CPU in float32,
    a one-channel 3x3 convolution with padding 1 and a bias (BatchNorm folded into it), a plain 2x2 max-pool."""
    if torch.is_grad_enabled() or not eager_cpu_float32(x):
        return False
    geometry = (conv.in_channels, conv.kernel_size, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    if type(conv) is not nn.Conv2d or geometry != (1, (3, 3), (1, 1), (1, 1), 1, "zeros") or conv.bias is None:
        return False
    if conv.stride[0] != conv.stride[1] or conv.weight.dtype != torch.float32:
        return False
    if type(bn) is not nn.Identity or not isinstance(pool, nn.MaxPool2d) or not plain_2x2(pool):
        return False
    # A convolution output under 2x2 leaves nothing to pool (and max_pool2d refuses it).
    if x.dim() != 4 or x.shape[0] == 0 or min(x.shape[-2:]) <= conv.stride[0]:
        return False
    return kernels() is not None


def covers(y: torch.Tensor, bn: nn.Module, pool: nn.Module) -> bool:
    """Whether relu(pool(bn(y))) can run as `bn_pool_relu`: a training step on the CPU in float32, a
    plain BatchNorm2d tracking its statistics, a 2x2 max-pool over an even height and width."""
    return y.dim() == 4 and _covers(y.shape, y, bn, pool)


def covers_after(x: torch.Tensor, conv: nn.Module, bn: nn.Module, pool: nn.Module) -> bool:
    """`covers` for y = conv(x), decided before the convolution runs (from the shape it will have)."""
    if type(conv) is not nn.Conv2d or isinstance(conv.padding, str) or x.dim() != 4:
        return False
    size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True)
    ]
    return _covers(torch.Size((x.shape[0], conv.out_channels, *size)), x, bn, pool)


def _covers(shape: torch.Size, y: torch.Tensor, bn: nn.Module, pool: nn.Module) -> bool:
    if not (bn.training and torch.is_grad_enabled()) or not eager_cpu_float32(y):
        return False
    if type(bn) is not nn.BatchNorm2d or not (bn.affine and bn.track_running_stats) or bn.momentum is None:
        return False
    if not plain_2x2(pool):
        return False
    if shape[0] == 0 or shape[-2] % 2 or shape[-1] % 2 or min(shape[-2:]) == 0:
        return False
    return kernels() is not None


def kernels():
    """The numba kernels (`pneumo.cpu.loader.load`), or None: then the standard modules run."""
    return load("pneumo.cpu.fused_kernels", "SmallCNN's blocks run fused on the CPU")


def stem_block(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(maxpool2x2(bn(conv(x)))) of a training step, BatchNorm's running statistics updated as
    nn.BatchNorm2d updates them. Only where `covers_stem`."""
    z, mean, var = _Stem.apply(x, conv.weight, bn.weight, bn.bias, conv.stride[0], bn.eps, bn.running_mean)
    _update_running_stats(bn, mean, var, x.shape[0] * z.shape[2] * z.shape[3] * 4)
    return z


def inference_stem(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """relu(maxpool2x2(conv(x))), channels_last, for a first block that `covers_inference_stem` accepts."""
    k = kernels()
    set_threads()
    n, _, h, w = x.shape
    stride = conv.stride[0]
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = torch.empty(n, conv.out_channels, out_h // 2, out_w // 2, memory_format=torch.channels_last)
    w9 = conv.weight.detach().reshape(conv.out_channels, 9).contiguous()
    k.stem_inference(
        _phase_split(x, stride).numpy(), w9.numpy(), conv.bias.detach().contiguous().numpy(), stride, nhwc(out)
    )
    return out


def bn_pool_relu(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """relu(maxpool2x2(bn(y))) of a training step, BatchNorm's running statistics updated as
    nn.BatchNorm2d updates them. Only where `covers`."""
    z, mean, var = _BnPoolRelu.apply(y, bn.weight, bn.bias, bn.eps, bn.running_mean)
    _update_running_stats(bn, mean, var, y.shape[0] * y.shape[2] * y.shape[3])
    return z


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    with torch.no_grad():
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), bn.momentum)
        bn.running_var.lerp_((var * count / max(count - 1, 1)).to(bn.running_var.dtype), bn.momentum)
        bn.num_batches_tracked.add_(1)


class _Norm:
    """BatchNorm's batch statistics from per-row partial sums of (y - shift) and its square, where the
    shift is the running mean (of earlier steps), close to this batch's mean: the variance is then free
    of cancellation. Everything per channel in float64."""

    def __init__(self, sums, sumsq, shift, count, gamma, beta, eps):
        offset = sums.double().sum(0) / count
        self.var = (sumsq.double().sum(0) / count - offset**2).clamp_(min=0)
        self.shift, self.count = shift.double(), count
        self.mean = self.shift + offset
        self.sigma = torch.sqrt(self.var + eps)
        self.scale = gamma.detach().double() / self.sigma
        self.bias = beta.detach().double() - self.scale * self.mean

    def affine_relu(self, pooled: torch.Tensor) -> torch.Tensor:
        """relu(scale * pooled + bias) of a channels_last tensor."""
        z = torch.empty_like(pooled)
        kernels().affine_relu(nhwc(pooled), self.scale.float().numpy(), self.bias.float().numpy(), nhwc(z))
        return z

    def backward_terms(self, dbeta_rows, dot_rows):
        """From per-row sums of g and of g * (pooled - shift), g the gradient at the pooled values:
        dbeta, dgamma, and (alpha, beta) such that each y's gradient is
        gamma / sigma * (g routed to it - alpha - beta * (y - shift))."""
        # With xhat = (y - mean) / sigma: dbeta = sum g, dgamma = sum g * xhat, and each y gets
        # gamma / sigma * (routed g - dbeta / count - xhat * dgamma / count).
        dbeta = dbeta_rows.double().sum(0)
        dgamma = (dot_rows.double().sum(0) - (self.mean - self.shift) * dbeta) / self.sigma
        beta = dgamma / self.count / self.sigma
        alpha = dbeta / self.count - (self.mean - self.shift) * beta
        return dbeta, dgamma, alpha, beta


class _Stem(torch.autograd.Function):
    """(x, conv weight, BN weight, BN bias) -> (block output, the batch's mean and biased variance of the
    convolution's output per channel). Gradients flow to the three parameters, not to x."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, stride, eps, running_mean):
        k = kernels()
        set_threads()
        n, _, h, w = x.shape
        channels, out_h, out_w = weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1
        # The kernel pools maxima: where BatchNorm's scale is negative, the block's maximum is the
        # convolution's minimum, so that channel's weights are negated and its maximum taken.
        sign = torch.where(gamma >= 0, 1.0, -1.0).to(torch.float32)
        w9 = (weight.detach().reshape(channels, 9) * sign[:, None]).contiguous()
        shift = (running_mean.detach().float() * sign).contiguous()
        xph = _phase_split(x, stride)
        pooled = torch.empty(n, channels, out_h // 2, out_w // 2, memory_format=torch.channels_last)
        code = torch.empty(pooled.shape, dtype=torch.uint8)
        sums, sumsq = torch.empty(2, n * pooled.shape[2], channels)
        k.stem_forward(
            xph.numpy(), w9.numpy(), stride, shift.numpy(), nhwc(pooled), code.numpy(), sums.numpy(), sumsq.numpy()
        )
        # In the sign-adjusted units BatchNorm's scale is |gamma| / sigma.
        norm = _Norm(sums, sumsq, shift, n * out_h * out_w, gamma.abs(), beta, eps)
        z = norm.affine_relu(pooled)
        ctx.stride, ctx.norm = stride, norm
        ctx.save_for_backward(xph, w9, pooled, code, z, sign, shift)
        mean, var = (norm.mean * sign).float(), norm.var.float()
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        xph, w9, pooled, code, z, sign, shift = ctx.saved_tensors
        k, norm = kernels(), ctx.norm
        set_threads()
        n, channels, hp, _ = pooled.shape
        sums, routed, gram = torch.empty(n * hp, 2, channels), torch.empty(n * hp, channels, 9), torch.empty(n * hp, 54)
        grad_z = grad_z.contiguous(memory_format=torch.channels_last)  # one layout: one compiled kernel
        saved = (nhwc(z), nhwc(pooled), code.numpy(), shift.numpy())
        k.stem_backward(xph.numpy(), ctx.stride, nhwc(grad_z), saved, (sums.numpy(), routed.numpy(), gram.numpy()))
        dbeta, dgamma, alpha, beta = norm.backward_terms(sums[:, 0], sums[:, 1])
        dw = _stem_weight_grad(routed, gram, w9, norm.shift, (alpha, beta)) * (norm.scale * sign)[:, None]
        return None, dw.float().view(-1, 1, 3, 3), (dgamma * sign).float(), dbeta.float(), None, None, None


def _stem_weight_grad(routed, gram, w9, shift, terms):
    """Sum over all outputs of dy * input at each tap, before BatchNorm's scale, in float64, where
    dy = g routed to the window's maximum - alpha - beta * (y - shift) and y = w9 . patch: the routed part
    summed by the kernel, the rest from the inputs' sums and Gram matrix (sum of y * input = w9 @ Gram)."""
    alpha, beta = terms
    totals = gram.double().sum(0)
    tap_sums, pairs = totals[:9], totals[9:]
    rows, cols = torch.triu_indices(9, 9)
    gram_matrix = torch.zeros(9, 9, dtype=torch.float64)
    gram_matrix[rows, cols] = pairs
    gram_matrix[cols, rows] = pairs
    centred = w9.double() @ gram_matrix - shift[:, None] * tap_sums
    return routed.double().sum(0) - alpha[:, None] * tap_sums - beta[:, None] * centred


class _BnPoolRelu(torch.autograd.Function):
    """(y, BN weight, BN bias) -> (relu(maxpool2x2(bn(y))), the batch's mean and biased variance of y per
    channel), on channels_last tensors."""

    @staticmethod
    def forward(ctx, y, gamma, beta, eps, running_mean):
        k = kernels()
        set_threads()
        y = y.detach().contiguous(memory_format=torch.channels_last)
        n, c, h, w = y.shape
        sign = torch.where(gamma >= 0, 1.0, -1.0).to(torch.float32)
        shift = running_mean.detach().float().clone()  # the running mean is updated after this step
        pooled = torch.empty(n, c, h // 2, w // 2, memory_format=torch.channels_last)
        code = torch.empty(pooled.shape, dtype=torch.uint8, memory_format=torch.channels_last)
        sums, sumsq = torch.empty(2, n * (h // 2), c)
        k.bn_pool_forward(nhwc(y), sign.numpy(), shift.numpy(), nhwc(pooled), nhwc(code), sums.numpy(), sumsq.numpy())
        norm = _Norm(sums, sumsq, shift, n * h * w, gamma, beta, eps)
        z = norm.affine_relu(pooled)
        ctx.norm = norm
        ctx.save_for_backward(y, pooled, code, z, shift)
        mean, var = norm.mean.float(), norm.var.float()
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        y, pooled, code, z, shift = ctx.saved_tensors
        k, norm = kernels(), ctx.norm
        set_threads()
        g = torch.empty_like(pooled)
        dbeta_rows, dot_rows = torch.empty(2, g.shape[0] * g.shape[2], g.shape[1])
        grad_z = grad_z.contiguous(memory_format=torch.channels_last)  # one layout: one compiled kernel
        k.pooled_grad(nhwc(grad_z), nhwc(z), nhwc(pooled), shift.numpy(), nhwc(g), dbeta_rows.numpy(), dot_rows.numpy())
        dbeta, dgamma, alpha, beta = norm.backward_terms(dbeta_rows, dot_rows)
        grad_y = torch.empty_like(y)
        k.bn_pool_input_grad(
            nhwc(y),
            nhwc(code),
            nhwc(g),
            norm.scale.float().numpy(),
            (shift.numpy(), alpha.float().numpy(), beta.float().numpy()),
            nhwc(grad_y),
        )
        return grad_y, dgamma.float(), dbeta.float(), None, None


def _phase_split(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The one-channel input (N, 1, H, W) zero-padded by one pixel and split by column phase, as the stem
    kernels read it (see `pneumo.cpu.fused_kernels`)."""
    n, _, h, w = x.shape
    period = 2 * stride
    xph = torch.empty(n, period, h + 2, -(-(w + 2) // period))
    kernels().phase_split(x.detach().reshape(n, h, w).contiguous().numpy(), period, xph.numpy())
    return xph
