"""The numba kernels behind `pneumo.cpu.winograd` (docs/performance.md, "Winograd"): for a 6x6 input tile
d, Y = A^T [U * (B^T d B)] A with U = G g G^T. `input_tiles` computes B^T d B for every tile;
`output_full` and `output_pool_relu` compute A^T M A for every product, the latter adding the bias and
taking each 2x2 window's maximum and the ReLU.

Layouts: images are channels_last (N, H, W, C). Tile (ty, tx) of image n covers output rows 4 ty to
4 ty + 3 and reads input rows 4 ty - 1 to 4 ty + 4 (outside: zeros); tiles are numbered
p = (n * tiles_h + ty) * tiles_w + tx; transformed arrays are (36, P, C), entry 6 i + j first.
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
# Computed indices go through _u: numba wraps a negative signed index around, and that check, on an
# index whose sign the compiler cannot prove, keeps a loop from vectorizing. Unsigned, it has none.
_u = np.uint64

# The signatures are declared so that the kernels compile (or load from numba's cache) when this
# module is imported, not at a first call in the middle of a run.
INPUT_SIGNATURE = "void(float32[:, :, :, ::1], int64, int64, float32[:, :, ::1])"
OUTPUT_SIGNATURE = "void(float32[:, :, ::1], float32[::1], int64, int64, float32[:, :, :, ::1])"
FULL_SIGNATURE = "void(float32[:, :, ::1], int64, int64, float32[:, :, :, ::1])"


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


@njit(cache=True, fastmath=FAST, inline="always")
def _rows_of_products(products, first, span):
    """t (4, 6, span) = A^T m for the tiles of one row, every tile at once: t[a, j, tx * K + k] for the
    products (36, P * K) from index first on."""
    t = np.empty((4, 6, span), np.float32)
    for j in range(6):
        for f in range(span):
            p = _u(first + f)
            a0, a1, a2, a3 = _at(products[j, p], products[6 + j, p], products[12 + j, p],
                                 products[18 + j, p], products[24 + j, p], products[30 + j, p])  # fmt: skip
            t[0, j, f], t[1, j, f], t[2, j, f], t[3, j, f] = a0, a1, a2, a3
    return t


@njit(INPUT_SIGNATURE, parallel=True, cache=True, fastmath=FAST)
def input_tiles(x, tiles_h, tiles_w, out):
    """out[6 i + j, p] = (B^T d B)[i, j] for every tile p of x (N, H, W, C); every element written."""
    n_img, h, w, c = x.shape
    span = (tiles_w + 1) * c
    pixels = x.reshape((n_img, h, w * c))
    tiles = out.reshape((36, out.shape[1] * c))
    for row in prange(n_img * tiles_h):
        n, ty = row // tiles_h, row % tiles_h
        # The six input rows this row of tiles reads, zero-padded and split into four phases: input
        # column 4 g - 1 + m is at d[i, m * span + g * c]. Column j (0 to 5) of tile tx is then phase
        # j % 4 of group tx + j // 4, so each step below is one long loop over (tile, channel) that
        # vectorizes, where a loop over one tile's channels is too short to.
        d = np.zeros((6, 4 * span), np.float32)
        for i in range(6):
            r = 4 * ty - 1 + i
            if 0 <= r < h:
                for q in range(w):
                    at, src = ((q + 1) % 4) * span + ((q + 1) // 4) * c, q * c
                    for k in range(c):
                        d[i, _u(at + k)] = pixels[n, r, _u(src + k)]
        t = np.empty((6, 4 * span), np.float32)  # B^T d, every column at once
        for f in range(4 * span):
            t0, t1, t2, t3, t4, t5 = _bt(d[0, f], d[1, f], d[2, f], d[3, f], d[4, f], d[5, f])
            t[0, f], t[1, f], t[2, f], t[3, f], t[4, f], t[5, f] = t0, t1, t2, t3, t4, t5
        first = row * tiles_w * c  # (B^T d) B, every tile at once: f = tx * c + k
        for i in range(6):
            fi = 6 * i
            for f in range(tiles_w * c):
                e0, e1, e2, e3 = t[i, f], t[i, _u(span + f)], t[i, _u(2 * span + f)], t[i, _u(3 * span + f)]
                v0, v1, v2, v3, v4, v5 = _bt(e0, e1, e2, e3, t[i, _u(c + f)], t[i, _u(span + c + f)])
                o = _u(first + f)
                tiles[fi, o], tiles[fi + 1, o], tiles[fi + 2, o] = v0, v1, v2
                tiles[fi + 3, o], tiles[fi + 4, o], tiles[fi + 5, o] = v3, v4, v5


@njit(OUTPUT_SIGNATURE, parallel=True, cache=True, fastmath=FAST)
def output_pool_relu(m, bias, tiles_h, tiles_w, out):
    """out (N, Hp, Wp, K) = relu(maxpool2x2(A^T m A + bias)) for the products m (36, P, K): each 4x4 output
    tile holds four whole pooling windows. Windows past Hp, Wp (an odd or padded edge) are dropped."""
    n_img, hp, wp, k_out = out.shape
    span = tiles_w * k_out
    products = m.reshape((36, m.shape[1] * k_out))
    pooled = out.reshape((n_img, hp, wp * k_out))
    for row in prange(n_img * tiles_h):
        n, ty = row // tiles_h, row % tiles_h
        t = _rows_of_products(products, row * span, span)
        for a in range(2):
            py, u, d = 2 * ty + a, 2 * a, 2 * a + 1
            if py >= hp:
                continue
            for tx in range(tiles_w):
                left, right = 2 * tx, 2 * tx + 1
                if left >= wp:
                    continue
                for k in range(k_out):
                    f = _u(tx * k_out + k)
                    y00, y01, y02, y03 = _at(t[u, 0, f], t[u, 1, f], t[u, 2, f], t[u, 3, f], t[u, 4, f], t[u, 5, f])
                    y10, y11, y12, y13 = _at(t[d, 0, f], t[d, 1, f], t[d, 2, f], t[d, 3, f], t[d, 4, f], t[d, 5, f])
                    pooled[n, py, _u(left * k_out + k)] = _relu(_max(_max(y00, y01), _max(y10, y11)) + bias[k])
                    if right < wp:
                        pooled[n, py, _u(right * k_out + k)] = _relu(_max(_max(y02, y03), _max(y12, y13)) + bias[k])


@njit(FULL_SIGNATURE, parallel=True, cache=True, fastmath=FAST)
def output_full(m, tiles_h, tiles_w, out):
    """out (N, H, W, K) = A^T m A for the products m (36, P, K): the convolution itself, each 4x4 tile
    cropped where it passes the image's edge."""
    n_img, h, w, k_out = out.shape
    span = tiles_w * k_out
    products = m.reshape((36, m.shape[1] * k_out))
    rows = out.reshape((n_img, h, w * k_out))
    for row in prange(n_img * tiles_h):
        n, ty = row // tiles_h, row % tiles_h
        t = _rows_of_products(products, row * span, span)
        for a in range(min(4, h - 4 * ty)):
            y = 4 * ty + a
            for tx in range(tiles_w):
                x0 = 4 * tx
                # A whole tile's four columns written out vectorize; the loop the edge's tiles need does not.
                if x0 + 4 <= w:
                    for k in range(k_out):
                        f = _u(tx * k_out + k)
                        v0, v1, v2, v3 = _at(t[a, 0, f], t[a, 1, f], t[a, 2, f], t[a, 3, f], t[a, 4, f], t[a, 5, f])
                        rows[n, y, _u(x0 * k_out + k)] = v0
                        rows[n, y, _u((x0 + 1) * k_out + k)] = v1
                        rows[n, y, _u((x0 + 2) * k_out + k)] = v2
                        rows[n, y, _u((x0 + 3) * k_out + k)] = v3
                else:
                    for k in range(k_out):
                        f = _u(tx * k_out + k)
                        v = _at(t[a, 0, f], t[a, 1, f], t[a, 2, f], t[a, 3, f], t[a, 4, f], t[a, 5, f])
                        for b in range(w - x0):
                            rows[n, y, _u((x0 + b) * k_out + k)] = v[b]
