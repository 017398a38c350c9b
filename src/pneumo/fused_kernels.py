"""The numba kernels behind `pneumo.fused`. Each loops over rows in parallel (mostly pooled rows,
t = n * Hp + j: image n, pooled row j) and writes only its own rows' outputs and partial sums, so the
results do not depend on the number of threads.

- The first block (`stem_*`): a one-channel 3x3 convolution, its 2x2 max-pool and BatchNorm's
  statistics in one pass over the image, and the convolution's weight gradient through BatchNorm and
  the pool in another that recomputes the convolution: the full-resolution output never exists.
- The other blocks (`bn_pool_*`): BatchNorm's statistics and the pool in one pass over a convolution's
  channels_last output, and its gradient in one pass backward.

Layouts: `xph` is the zero-padded image split by column phase, xph[n, p, r, m] = padded column
`period * m + p` of row r, period = 2 * stride: then the input columns that any output column of one
pooling window reads are contiguous runs, and the loops vectorize. `w` is (C, 9), taps in row-major
order. Window positions are numbered ab = 2a + b (row a, column b), the order max_pool2d scans them in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Reassociation lets the sums vectorize; no nnan/ninf, so NaN propagates through the pool as in torch.
FAST = {"reassoc", "contract", "arcp", "nsz"}


@njit(parallel=True, cache=True, fastmath=FAST)
def phase_split(x, period, out):
    """out (N, period, H + 2, M): x (N, H, W) zero-padded by one pixel and split by column phase. `out`
    must be zeroed beforehand: only the image's pixels are written."""
    n_img, h, w = x.shape
    for t in prange(n_img * h):
        n, r = t // h, t % h
        row = x[n, r]
        for p in range(period):
            dest = out[n, p, r + 1]
            # padded column period * m + p is image column period * m + p - 1
            first = 1 if p == 0 else 0
            last = min(dest.shape[0], (w - p) // period + 1)
            for m in range(first, last):
                dest[m] = row[period * m + p - 1]


@njit(cache=True, fastmath=FAST, inline="always")
def _taps(xph, n, j, ab, stride, wp):
    """The nine runs of input (length wp) that outputs (2j + a, 2l + b), l < wp, read, tap by tap."""
    period = 2 * stride
    a, b = ab // 2, ab % 2
    r = stride * (2 * j + a)
    o0, o1, o2 = stride * b, stride * b + 1, stride * b + 2
    p0, p1, p2 = o0 % period, o1 % period, o2 % period
    f0, f1, f2 = o0 // period, o1 // period, o2 // period
    return (
        xph[n, p0, r, f0 : f0 + wp],
        xph[n, p1, r, f1 : f1 + wp],
        xph[n, p2, r, f2 : f2 + wp],
        xph[n, p0, r + 1, f0 : f0 + wp],
        xph[n, p1, r + 1, f1 : f1 + wp],
        xph[n, p2, r + 1, f2 : f2 + wp],
        xph[n, p0, r + 2, f0 : f0 + wp],
        xph[n, p1, r + 2, f1 : f1 + wp],
        xph[n, p2, r + 2, f2 : f2 + wp],
    )


@njit(cache=True, fastmath=FAST, inline="always")
def _conv(taps, w, c, shift, out):
    """out[l] = channel c's output at the taps' positions, minus `shift`."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = taps
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[c, 0], w[c, 1], w[c, 2], w[c, 3], w[c, 4], w[c, 5], w[c, 6], w[c, 7], w[c, 8]
    for m in range(out.shape[0]):
        out[m] = (
            w0 * s0[m] + w1 * s1[m] + w2 * s2[m] + w3 * s3[m] + w4 * s4[m] + w5 * s5[m] + w6 * s6[m] + w7 * s7[m]
        ) + (w8 * s8[m] - shift)


@njit(cache=True, fastmath=FAST, inline="always")
def _take(v, best, which, ab):
    # max_pool2d's rule: a later value wins if greater or NaN, and nothing replaces a NaN.
    take = (v > best or v != v) and best == best
    return (v if take else best), (ab if take else which)


@njit(parallel=True, cache=True, fastmath=FAST)
def stem_forward(xph, w, stride, shift, pooled, code, sums, sumsq):
    """pooled (N, C, Hp, Wp): the 2x2 maximum of each channel's convolution; code: which of the window's
    four positions held it (ab); sums, sumsq (N * Hp, C): per pooled row, the sums of (y - shift) and of
    its square over the row's 4 * Wp outputs, for the BatchNorm statistics (shift close to the mean keeps
    the variance free of cancellation)."""
    n_img, c_out, hp, wp = pooled.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        y = np.empty((4, wp), np.float32)
        y0, y1, y2, y3 = y[0], y[1], y[2], y[3]
        t0, t1 = _taps(xph, n, j, 0, stride, wp), _taps(xph, n, j, 1, stride, wp)
        t2, t3 = _taps(xph, n, j, 2, stride, wp), _taps(xph, n, j, 3, stride, wp)
        for c in range(c_out):
            _conv(t0, w, c, np.float32(0), y0)
            _conv(t1, w, c, np.float32(0), y1)
            _conv(t2, w, c, np.float32(0), y2)
            _conv(t3, w, c, np.float32(0), y3)
            k = shift[c]
            s, q = np.float32(0), np.float32(0)
            prow, crow = pooled[n, c, j], code[n, c, j]
            for m in range(wp):
                v0, v1, v2, v3 = y0[m], y1[m], y2[m], y3[m]
                d0, d1, d2, d3 = v0 - k, v1 - k, v2 - k, v3 - k
                s += (d0 + d1) + (d2 + d3)
                q += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                best, which = _take(v1, v0, 0, 1)
                best, which = _take(v2, best, which, 2)
                best, which = _take(v3, best, which, 3)
                prow[m] = best
                crow[m] = which
            sums[t, c], sumsq[t, c] = s, q


@njit(cache=True, fastmath=FAST, inline="always")
def _window_grad(taps, w, c, ab, terms, rows, y, acc):
    """acc[tap] += sum over the window position ab's outputs of dy * input at tap, where dy is the
    gradient routed through the pool (grow where crow says ab held the maximum) minus BatchNorm's terms
    alpha + beta * (y - shift), terms = (shift, alpha, beta) of channel c."""
    shift, alpha, beta = terms
    grow, crow = rows
    _conv(taps, w, c, shift, y)
    for m in range(y.shape[0]):
        routed = grow[m] if crow[m] == ab else np.float32(0)
        y[m] = routed - alpha - beta * y[m]
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = taps
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = np.float32(0)
    for m in range(y.shape[0]):
        d = y[m]
        a0 += d * s0[m]
        a1 += d * s1[m]
        a2 += d * s2[m]
        a3 += d * s3[m]
        a4 += d * s4[m]
        a5 += d * s5[m]
        a6 += d * s6[m]
        a7 += d * s7[m]
        a8 += d * s8[m]
    acc[0] += a0
    acc[1] += a1
    acc[2] += a2
    acc[3] += a3
    acc[4] += a4
    acc[5] += a5
    acc[6] += a6
    acc[7] += a7
    acc[8] += a8


@njit(parallel=True, cache=True, fastmath=FAST)
def stem_weight_grad(xph, w, stride, terms, grad, code, out):
    """out (N * Hp, C, 9): per pooled row, the weight gradient's share (before BatchNorm's scale) of the
    outputs in that row's windows, for the gradient `grad` (N, C, Hp, Wp) at the pooled maxima and
    BatchNorm's per-channel terms = (shift, alpha, beta) (see `_window_grad`)."""
    shift, alpha, beta = terms
    n_img, c_out, hp, wp = grad.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        y = np.empty(wp, np.float32)
        t0, t1 = _taps(xph, n, j, 0, stride, wp), _taps(xph, n, j, 1, stride, wp)
        t2, t3 = _taps(xph, n, j, 2, stride, wp), _taps(xph, n, j, 3, stride, wp)
        for c in range(c_out):
            rows, channel_terms, acc = (grad[n, c, j], code[n, c, j]), (shift[c], alpha[c], beta[c]), out[t, c]
            acc[:] = 0
            _window_grad(t0, w, c, 0, channel_terms, rows, y, acc)
            _window_grad(t1, w, c, 1, channel_terms, rows, y, acc)
            _window_grad(t2, w, c, 2, channel_terms, rows, y, acc)
            _window_grad(t3, w, c, 3, channel_terms, rows, y, acc)


@njit(parallel=True, cache=True, fastmath=FAST)
def pooled_grad(grad_z, z, pooled, shift, grad, dbeta, dot):
    """The gradient at the pooled maxima, through the ReLU: grad (N, C, Hp, Wp) = grad_z where z > 0;
    per pooled row t = n * Hp + j, dbeta[t, c] = its sum and dot[t, c] = its sum times (pooled - shift).
    grad_z and z come in the (N, Hp, Wp, C) order of channels_last tensors."""
    n_img, c_out, hp, wp = grad.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        for c in range(c_out):
            grow, prow, k = grad[n, c, j], pooled[n, c, j], shift[c]
            s, d = np.float32(0), np.float32(0)
            for m in range(wp):
                g = grad_z[n, j, m, c] if z[n, j, m, c] > 0 else np.float32(0)
                grow[m] = g
                s += g
                d += g * (prow[m] - k)
            dbeta[t, c], dot[t, c] = s, d


# BatchNorm, 2x2 max-pool and ReLU after any convolution, on its channels_last output y (N, H, W, C).


@njit(parallel=True, cache=True, fastmath=FAST)
def bn_pool_forward(y, sign, shift, pooled, code, sums, sumsq):
    """pooled (N, Hp, Wp, C): per 2x2 window and channel, the maximum of y where sign is +1, the minimum
    where it is -1 (where BatchNorm's scale is negative); code: which of the window's positions (ab) it
    came from; sums, sumsq (N * Hp, C): per pooled row, the sums of (y - shift) and of its square."""
    n_img, hp, wp, c_out = pooled.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        s = sums[t]
        q = sumsq[t]
        s[:] = 0
        q[:] = 0
        top, bottom = y[n, 2 * j], y[n, 2 * j + 1]
        for m in range(wp):
            y0, y1, y2, y3 = top[2 * m], top[2 * m + 1], bottom[2 * m], bottom[2 * m + 1]
            prow, crow = pooled[n, j, m], code[n, j, m]
            for c in range(c_out):
                k, sg = shift[c], sign[c]
                v0, v1, v2, v3 = y0[c], y1[c], y2[c], y3[c]
                d0, d1, d2, d3 = v0 - k, v1 - k, v2 - k, v3 - k
                s[c] += (d0 + d1) + (d2 + d3)
                q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                best, which = _take(sg * v1, sg * v0, 0, 1)
                best, which = _take(sg * v2, best, which, 2)
                best, which = _take(sg * v3, best, which, 3)
                prow[c] = sg * best
                crow[c] = which


@njit(parallel=True, cache=True, fastmath=FAST)
def pooled_grad_nhwc(grad_z, z, pooled, shift, grad, dbeta, dot):
    """As `pooled_grad`, with grad (N, Hp, Wp, C) in the channels_last order too."""
    n_img, hp, wp, c_out = grad.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        s, d = dbeta[t], dot[t]
        s[:] = 0
        d[:] = 0
        for m in range(wp):
            grow, gzrow, zrow, prow = grad[n, j, m], grad_z[n, j, m], z[n, j, m], pooled[n, j, m]
            for c in range(c_out):
                g = gzrow[c] if zrow[c] > 0 else np.float32(0)
                grow[c] = g
                s[c] += g
                d[c] += g * (prow[c] - shift[c])


@njit(parallel=True, cache=True, fastmath=FAST)
def bn_pool_input_grad(y, code, grad, scale, terms, out):
    """out (N, H, W, C), the gradient of y: scale * (g routed to the window's chosen position - alpha -
    beta * (y - shift)), with grad (N, Hp, Wp, C) the gradient at the pooled values and
    terms = (shift, alpha, beta)."""
    shift, alpha, beta = terms
    n_img, hp, wp, c_out = grad.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        for a in range(2):
            yrow, orow = y[n, 2 * j + a], out[n, 2 * j + a]
            for m in range(wp):
                grow, crow = grad[n, j, m], code[n, j, m]
                for b in range(2):
                    ab = 2 * a + b
                    yv, ov = yrow[2 * m + b], orow[2 * m + b]
                    for c in range(c_out):
                        routed = grow[c] if crow[c] == ab else np.float32(0)
                        ov[c] = scale[c] * (routed - alpha[c] - beta[c] * (yv[c] - shift[c]))
