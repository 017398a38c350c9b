"""The numba kernels behind `pneumo.cpu.fused` (docs/performance.md, "Fused blocks").

Each loops over rows in parallel (mostly pooled rows, t = n * Hp + j: image n, pooled row j) and writes
only its own rows' outputs and partial sums, so results do not depend on the number of threads.
`stem_*`: the first block (one-channel convolution, pool, statistics, weight-gradient terms);
`bn_pool_*`: BatchNorm's statistics and the pool over a channels_last output, and its gradient;
`affine_relu`: BatchNorm's map and the ReLU on pooled values; `stem_inference`: a folded first block.
Layouts: `xph[n, p, r, m]` is padded column `period * m + p` of row r (period = 2 * stride), so each
pooling window reads contiguous runs; `w` is (C, 9), taps row-major; window positions ab = 2a + b.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Reassociation lets the sums vectorize; no nnan/ninf, so NaN propagates through the pool as in torch.
FAST = {"reassoc", "contract", "arcp", "nsz"}
# An index computed in a loop goes through _u: numba wraps a negative signed index around, and that check,
# on an index whose sign the compiler cannot prove, keeps the loop from vectorizing. Unsigned, it has none.
_u = np.uint64
# Inference runs without reassociation or contraction into FMAs: with them, kernels numba had just
# compiled rounded differently from the same kernels loaded from its cache (see pneumo.cpu.winograd_kernels).
EXACT = {"arcp", "nsz"}


# Declared, so that they compile (or load from numba's cache) when this module is imported, not at a first
# call in the middle of a run.
PHASE_SPLIT_SIGNATURE = "void(float32[:, :, ::1], int64, float32[:, :, :, ::1])"
STEM_INFERENCE_SIGNATURE = "void(float32[:, :, :, ::1], float32[:, ::1], float32[::1], int64, float32[:, :, :, ::1])"


@njit(PHASE_SPLIT_SIGNATURE, parallel=True, cache=True, fastmath=FAST)
def phase_split(x, period, out):
    """out (N, period, H + 2, M): x (N, H, W) zero-padded by one pixel and split by column phase, every
    element written (the padding's zeros too)."""
    n_img, h, w = x.shape
    for t in prange(n_img * (h + 2)):
        n, r = t // (h + 2), t % (h + 2)
        for p in range(period):
            dest = out[n, p, r]
            if r == 0 or r == h + 1:
                dest[:] = 0
                continue
            row = x[n, r - 1]
            # padded column period * m + p is image column period * m + p - 1
            first = 1 if p == 0 else 0
            last = min(dest.shape[0], (w - p) // period + 1)
            dest[:first] = 0
            for m in range(first, last):
                dest[m] = row[_u(period * m + p - 1)]
            dest[last:] = 0


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
def _conv(taps, w, c, out):
    """out[l] = channel c's output at the taps' positions."""
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = taps
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = w[c, 0], w[c, 1], w[c, 2], w[c, 3], w[c, 4], w[c, 5], w[c, 6], w[c, 7], w[c, 8]
    for m in range(out.shape[0]):
        out[m] = (
            w0 * s0[m] + w1 * s1[m] + w2 * s2[m] + w3 * s3[m] + w4 * s4[m] + w5 * s5[m] + w6 * s6[m] + w7 * s7[m]
        ) + w8 * s8[m]


@njit(cache=True, fastmath=FAST, inline="always")
def _channels_last(rows, dest):
    """dest (Wp, C) = rows (C, Wp), transposed."""
    for m in range(dest.shape[0]):
        for c in range(dest.shape[1]):
            dest[m, c] = rows[c, m]


@njit(cache=True, fastmath=FAST, inline="always")
def _take(v, best, which, ab):
    # max_pool2d's rule: a later value wins if greater or NaN, and nothing replaces a NaN.
    take = (v > best or v != v) and best == best
    return (v if take else best), (ab if take else which)


@njit(parallel=True, cache=True, fastmath=FAST)
def stem_forward(xph, w, stride, shift, pooled, code, sums, sumsq):
    """pooled (N, Hp, Wp, C), the channels_last order: the 2x2 maximum of each channel's convolution;
    code (N, C, Hp, Wp): which of the window's four positions held it (ab); sums, sumsq (N * Hp, C): per
    pooled row, the sums of (y - shift) and of its square over the row's 4 * Wp outputs, for the
    BatchNorm statistics (shift close to the mean keeps the variance free of cancellation)."""
    n_img, hp, wp, c_out = pooled.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        rows = np.empty((c_out, wp), np.float32)
        y = np.empty((4, wp), np.float32)
        y0, y1, y2, y3 = y[0], y[1], y[2], y[3]
        t0, t1 = _taps(xph, n, j, 0, stride, wp), _taps(xph, n, j, 1, stride, wp)
        t2, t3 = _taps(xph, n, j, 2, stride, wp), _taps(xph, n, j, 3, stride, wp)
        for c in range(c_out):
            _conv(t0, w, c, y0)
            _conv(t1, w, c, y1)
            _conv(t2, w, c, y2)
            _conv(t3, w, c, y3)
            k = shift[c]
            s, q = np.float32(0), np.float32(0)
            prow, crow = rows[c], code[n, c, j]
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
        _channels_last(rows, pooled[n, j])


@njit(parallel=True, cache=True, fastmath=FAST)
def stem_backward(xph, stride, grad_z, saved, out):
    """Everything the first block's backward needs from its pooled rows, in one pass (the gradient at the
    pooled maxima is g = grad_z where z > 0; grad_z, z and pooled come in the (N, Hp, Wp, C) order of
    channels_last tensors, code in (N, C, Hp, Wp)); saved = (z, pooled, code, shift) from the forward pass,
    out = (sums, routed, gram). Per pooled row t = n * Hp + j:
    - sums[t] = (sum of g, sum of g * (pooled - shift)) per channel, for BatchNorm's backward terms;
    - routed[t, c, tap] = the sum of g times the input at that tap of the window position holding the
      maximum (code): the part of the weight gradient that flows through the pool;
    - gram[t] = over all the row's window positions, the sum of each tap's input (9 values), then of the
      product of each pair of taps (45, in row-major order of the upper triangle): BatchNorm's terms
      reach every output, and through these the weight gradient needs no convolution recomputed."""
    z, pooled, code, shift = saved
    sums, routed, gram = out
    n_img, hp, wp, c_out = grad_z.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        t0, t1 = _taps(xph, n, j, 0, stride, wp), _taps(xph, n, j, 1, stride, wp)
        t2, t3 = _taps(xph, n, j, 2, stride, wp), _taps(xph, n, j, 3, stride, wp)
        g = _routed_gradient(grad_z[n, j], z[n, j], pooled[n, j], shift, sums[t])
        for c in range(c_out):
            _routed(t0, t1, t2, t3, g[c], code[n, c, j], routed[t, c])
        _gram((t0, t1, t2, t3), wp, gram[t])


@njit(cache=True, fastmath=FAST, inline="always")
def _routed_gradient(gz, zz, pz, shift, sums):
    """g = gz where zz > 0, as (C, Wp) from (Wp, C) rows, and sums = (sum of g, sum of g * (pz - shift))
    per channel. Selecting and summing in the rows' own order vectorizes (no branch to mispredict on the
    ReLU's signs); the transposition comes after."""
    wp, c_out = gz.shape
    selected = np.empty((wp, c_out), np.float32)
    _pooled_grad_row(gz, zz, pz, shift, selected, sums[0], sums[1])
    g = np.empty((c_out, wp), np.float32)
    for c in range(c_out):
        for m in range(wp):
            g[c, m] = selected[m, c]
    return g


@njit(cache=True, fastmath=FAST, inline="always")
def _routed(t0, t1, t2, t3, grow, crow, acc):
    """acc[tap] = the sum of grow times the input at tap of the window position (ab) that crow names,
    from the taps of the four positions."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = np.float32(0)
    for m in range(grow.shape[0]):
        g, ab = grow[m], crow[m]
        d0 = g if ab == 0 else np.float32(0)
        d1 = g if ab == 1 else np.float32(0)
        d2 = g if ab == 2 else np.float32(0)
        d3 = g if ab == 3 else np.float32(0)
        a0 += (d0 * t0[0][m] + d1 * t1[0][m]) + (d2 * t2[0][m] + d3 * t3[0][m])
        a1 += (d0 * t0[1][m] + d1 * t1[1][m]) + (d2 * t2[1][m] + d3 * t3[1][m])
        a2 += (d0 * t0[2][m] + d1 * t1[2][m]) + (d2 * t2[2][m] + d3 * t3[2][m])
        a3 += (d0 * t0[3][m] + d1 * t1[3][m]) + (d2 * t2[3][m] + d3 * t3[3][m])
        a4 += (d0 * t0[4][m] + d1 * t1[4][m]) + (d2 * t2[4][m] + d3 * t3[4][m])
        a5 += (d0 * t0[5][m] + d1 * t1[5][m]) + (d2 * t2[5][m] + d3 * t3[5][m])
        a6 += (d0 * t0[6][m] + d1 * t1[6][m]) + (d2 * t2[6][m] + d3 * t3[6][m])
        a7 += (d0 * t0[7][m] + d1 * t1[7][m]) + (d2 * t2[7][m] + d3 * t3[7][m])
        a8 += (d0 * t0[8][m] + d1 * t1[8][m]) + (d2 * t2[8][m] + d3 * t3[8][m])
    acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7], acc[8] = a0, a1, a2, a3, a4, a5, a6, a7, a8


@njit(cache=True, fastmath=FAST, inline="always")
def _gram(taps, wp, out):
    """out = over the outputs of the four window positions' taps, the sum of each tap's input, then of each
    pair's product. The four positions side by side make runs of 4 * wp: long enough that the vectorized
    sums leave no scalar remainder worth the name."""
    patches = np.empty((9, 4 * wp), np.float32)
    for ab in range(4):
        for i in range(9):
            patches[i, ab * wp : (ab + 1) * wp] = taps[ab][i]
    pair = 9
    for i in range(9):
        si = patches[i]
        a = np.float32(0)
        for m in range(si.shape[0]):
            a += si[m]
        out[i] = a
        for k in range(i, 9):
            sk = patches[k]
            a = np.float32(0)
            for m in range(si.shape[0]):
                a += si[m] * sk[m]
            out[pair] = a
            pair += 1


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
def pooled_grad(grad_z, z, pooled, shift, grad, dbeta, dot):
    """The gradient at the pooled values, through the ReLU: grad = grad_z where z > 0, all (N, Hp, Wp, C);
    per pooled row t = n * Hp + j, dbeta[t] = its sum and dot[t] = its sum times (pooled - shift), per
    channel."""
    n_img, hp, _, _ = grad.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        _pooled_grad_row(grad_z[n, j], z[n, j], pooled[n, j], shift, grad[n, j], dbeta[t], dot[t])


@njit(cache=True, fastmath=FAST, inline="always")
def _pooled_grad_row(gz, zz, pz, shift, g, s, d):
    """For one pooled row of (Wp, C): g = gz where zz > 0, s = its sum and d = its sum times (pz - shift)
    per channel. A select, not a branch: the ReLU's signs would mispredict one."""
    s[:] = 0
    d[:] = 0
    for m in range(gz.shape[0]):
        for c in range(gz.shape[1]):
            v = gz[m, c] if zz[m, c] > 0 else np.float32(0)
            g[m, c] = v
            s[c] += v
            d[c] += v * (pz[m, c] - shift[c])


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


@njit(parallel=True, cache=True, fastmath=FAST)
def affine_relu(pooled, scale, bias, out):
    """out = relu(scale * pooled + bias) per channel, both (N, Hp, Wp, C): BatchNorm's affine map and the
    ReLU in one pass (NaN stays NaN, as in torch's ReLU)."""
    n_img, hp, wp, c_out = pooled.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        src, dest = pooled[n, j], out[n, j]
        for m in range(wp):
            for c in range(c_out):
                v = src[m, c] * scale[c] + bias[c]
                dest[m, c] = v if v > 0 or v != v else np.float32(0)


@njit(cache=True, fastmath=EXACT, inline="always")
def _max(a, b):
    """max(a, b), NaN if either is NaN (as max_pool2d)."""
    return a if a >= b or a != a else b


@njit(STEM_INFERENCE_SIGNATURE, parallel=True, cache=True, fastmath=EXACT)
def stem_inference(xph, w, bias, stride, out):
    """out (N, Hp, Wp, C), the channels_last order: relu(maxpool2x2(conv + bias)) of a folded first block,
    the convolution computed a pooled row at a time as in `stem_forward`."""
    n_img, hp, wp, c_out = out.shape
    for t in prange(n_img * hp):
        n, j = t // hp, t % hp
        rows = np.empty((c_out, wp), np.float32)
        y = np.empty((4, wp), np.float32)
        y0, y1, y2, y3 = y[0], y[1], y[2], y[3]
        t0, t1 = _taps(xph, n, j, 0, stride, wp), _taps(xph, n, j, 1, stride, wp)
        t2, t3 = _taps(xph, n, j, 2, stride, wp), _taps(xph, n, j, 3, stride, wp)
        for c in range(c_out):
            _conv(t0, w, c, y0)
            _conv(t1, w, c, y1)
            _conv(t2, w, c, y2)
            _conv(t3, w, c, y3)
            b, row = bias[c], rows[c]
            for m in range(wp):
                v = _max(_max(y0[m], y1[m]), _max(y2[m], y3[m])) + b
                row[m] = v if v > 0 or v != v else np.float32(0)
        _channels_last(rows, out[n, j])
