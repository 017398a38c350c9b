"""The numba kernels behind `pneumo.winograd`: the two transforms of Winograd's F(4x4, 3x3) around the
matrix products that torch runs, for one chunk of images.

A 3x3 convolution (a correlation, as in every CNN) of a 6x6 input tile d gives a 4x4 output tile
Y = A^T [U * (B^T d B)] A, where U = G g G^T is the transformed 3x3 kernel g and * multiplies element
by element: 36 products per input and output channel pair instead of 144. Summed over input
channels, the 36 elementwise products are 36 matrix products, (tiles x C) by (C x K), which torch
runs; these kernels compute B^T d B for every tile (`input_tiles`) and A^T M A for every product
(`output_pool_relu`), which also adds the bias, takes each 2x2 window's maximum and the ReLU, so
that the full-resolution output is never written.

Layouts: images are channels_last (N, H, W, C) with C contiguous, so every inner loop runs over
channels and vectorizes. Tile (ty, tx) of image n covers output rows 4 ty to 4 ty + 3 and reads input
rows 4 ty - 1 to 4 ty + 4 (outside the image: zeros, the convolution's padding); tiles are numbered
p = (n * tiles_h + ty) * tiles_w + tx. Transformed arrays are (36, P, C): entry 6 i + j of the 6 x 6
transform, then tile, then channel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# No reassociation or contraction into FMAs: with them, the kernels numba had just compiled and the
# same kernels loaded from its cache rounded differently, so a model scored differently at the first
# run after installing. No nnan/ninf either, so NaN propagates through the pool as in torch.
FAST = {"arcp", "nsz"}
# float32 constants, so that the transforms stay in float32 (a literal integer would promote to float64)
_2, _4, _5, _8 = np.float32(2), np.float32(4), np.float32(5), np.float32(8)

# The signatures are declared so that the kernels compile (or load from numba's cache) when this
# module is imported, not at a first call in the middle of a run.
INPUT_SIGNATURE = "void(float32[:, :, :, ::1], int64, int64, float32[:, :, ::1])"
OUTPUT_SIGNATURE = "void(float32[:, :, ::1], float32[::1], int64, int64, float32[:, :, :, ::1])"


@njit(cache=True, fastmath=FAST, inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T d for one column d of six values."""
    return (
        _4 * d0 - _5 * d2 + d4,
        d3 + d4 - _4 * (d1 + d2),
        d4 - d3 + _4 * (d1 - d2),
        d4 - d2 + _2 * (d3 - d1),
        d4 - d2 + _2 * (d1 - d3),
        _4 * d1 - _5 * d3 + d5,
    )


@njit(cache=True, fastmath=FAST, inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    """A^T m for one column m of six values."""
    return (
        m0 + m1 + m2 + m3 + m4,
        m1 - m2 + _2 * (m3 - m4),
        m1 + m2 + _4 * (m3 + m4),
        m1 - m2 + _8 * (m3 - m4) + m5,
    )


@njit(cache=True, fastmath=FAST, inline="always")
def _max(a, b):
    """max(a, b), NaN if either is NaN (as torch.maximum and max_pool2d)."""
    return a if a >= b or a != a else b


@njit(cache=True, fastmath=FAST, inline="always")
def _relu(v):
    return v if v > 0 or v != v else np.float32(0)


@njit(INPUT_SIGNATURE, parallel=True, cache=True, fastmath=FAST)
def input_tiles(x, tiles_h, tiles_w, out):
    """out[6 i + j, p] = (B^T d B)[i, j] for every tile p of x (N, H, W, C); every element written."""
    n_img, h, w, c = x.shape
    for row in prange(n_img * tiles_h):
        n, ty = row // tiles_h, row % tiles_h
        # The six input rows this row of tiles reads, zero-padded: the tiles then need no bounds checks.
        s = np.zeros((6, 4 * tiles_w + 2, c), np.float32)
        for i in range(6):
            r = 4 * ty - 1 + i
            if 0 <= r < h:
                s[i, 1 : w + 1] = x[n, r]
        t = np.empty((6, 6, c), np.float32)  # B^T d: t[i, j] is row i of the transform, column j
        for tx in range(tiles_w):
            p = row * tiles_w + tx
            for j in range(6):
                q = 4 * tx + j
                for k in range(c):
                    t0, t1, t2, t3, t4, t5 = _bt(s[0, q, k], s[1, q, k], s[2, q, k], s[3, q, k], s[4, q, k], s[5, q, k])
                    t[0, j, k], t[1, j, k], t[2, j, k], t[3, j, k], t[4, j, k], t[5, j, k] = t0, t1, t2, t3, t4, t5
            for i in range(6):
                f = 6 * i
                for k in range(c):
                    v0, v1, v2, v3, v4, v5 = _bt(t[i, 0, k], t[i, 1, k], t[i, 2, k], t[i, 3, k], t[i, 4, k], t[i, 5, k])
                    out[f, p, k], out[f + 1, p, k], out[f + 2, p, k] = v0, v1, v2
                    out[f + 3, p, k], out[f + 4, p, k], out[f + 5, p, k] = v3, v4, v5


@njit(OUTPUT_SIGNATURE, parallel=True, cache=True, fastmath=FAST)
def output_pool_relu(m, bias, tiles_h, tiles_w, out):
    """out (N, Hp, Wp, K) = relu(maxpool2x2(A^T m A + bias)) for the products m (36, P, K): each 4x4 output
    tile holds four whole pooling windows. Windows past Hp, Wp (an odd or padded edge) are dropped."""
    n_img, hp, wp, k_out = out.shape
    for row in prange(n_img * tiles_h):
        n, ty = row // tiles_h, row % tiles_h
        t = np.empty((4, 6, k_out), np.float32)  # A^T m: t[a, j] is output row a, column j of m A
        for tx in range(tiles_w):
            p = row * tiles_w + tx
            for j in range(6):
                for k in range(k_out):
                    a0, a1, a2, a3 = _at(m[j, p, k], m[6 + j, p, k], m[12 + j, p, k],
                                         m[18 + j, p, k], m[24 + j, p, k], m[30 + j, p, k])  # fmt: skip
                    t[0, j, k], t[1, j, k], t[2, j, k], t[3, j, k] = a0, a1, a2, a3
            left, right = 2 * tx, 2 * tx + 1
            for a in range(2):
                py, u, d = 2 * ty + a, 2 * a, 2 * a + 1
                if py >= hp:
                    continue
                for k in range(k_out):
                    y00, y01, y02, y03 = _at(t[u, 0, k], t[u, 1, k], t[u, 2, k], t[u, 3, k], t[u, 4, k], t[u, 5, k])
                    y10, y11, y12, y13 = _at(t[d, 0, k], t[d, 1, k], t[d, 2, k], t[d, 3, k], t[d, 4, k], t[d, 5, k])
                    if left < wp:
                        out[n, py, left, k] = _relu(_max(_max(y00, y01), _max(y10, y11)) + bias[k])
                    if right < wp:
                        out[n, py, right, k] = _relu(_max(_max(y02, y03), _max(y12, y13)) + bias[k])
