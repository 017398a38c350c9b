"""Layers with explicit forward and backward passes, in NumPy.

Every layer keeps what its backward pass needs from the last forward call, and exposes `params`
and `grads` (dicts with the same keys; `backward` fills `grads`) and, for BatchNorm, `buffers`.
Shapes, names and layouts are torch's (NCHW; Conv2d weight (out, in, kh, kw); Linear weight
(out, in)), so a torch state dict maps onto a model one-to-one.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class Layer:
    training = True

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def train(self, mode: bool = True) -> Layer:
        self.training = mode
        return self

    def eval(self) -> Layer:
        return self.train(False)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**self.params, **self.buffers}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy arrays in place (optimizers hold references to them); names and shapes must match."""
        own = self.state_dict()
        _check_names(own, state)
        for name, array in own.items():
            value = np.asarray(state[name])
            if value.shape != array.shape:
                raise ValueError(f"{name}: shape {value.shape} does not fit {array.shape}")
            array[...] = value


def _check_names(own: dict, state: dict) -> None:
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def _uniform_init(rng: np.random.Generator, shape, fan_in: int, dtype) -> np.ndarray:
    # torch's default for Linear and Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    bound = 1 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(dtype)


class Linear(Layer):
    """y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=np.float64, rng=None):
        super().__init__()
        rng = rng or np.random.default_rng()
        self.params["weight"] = _uniform_init(rng, (out_features, in_features), in_features, dtype)
        if bias:
            self.params["bias"] = _uniform_init(rng, (out_features,), in_features, dtype)

    def forward(self, x):
        self.x = x
        out = x @ self.params["weight"].T
        return out + self.params["bias"] if "bias" in self.params else out

    def backward(self, dout):
        self.grads["weight"] = dout.T @ self.x
        if "bias" in self.params:
            self.grads["bias"] = dout.sum(axis=0)
        return dout @ self.params["weight"]


class Conv2d(Layer):
    """2-D cross-correlation (what deep learning calls convolution), as one matrix product (im2col).

    out[n, o, h, w] = b[o] + sum over c, i, j of W[o, c, i, j] * x_padded[n, c, h*s + i, w*s + j]
    """

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=np.float64, rng=None
    ):
        super().__init__()
        rng = rng or np.random.default_rng()
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding = stride, padding
        kh, kw = self.kernel_size
        fan_in = in_channels * kh * kw
        self.params["weight"] = _uniform_init(rng, (out_channels, in_channels, kh, kw), fan_in, dtype)
        if bias:
            self.params["bias"] = _uniform_init(rng, (out_channels,), fan_in, dtype)

    def forward(self, x):
        w = self.params["weight"]
        out_c, _, kh, kw = w.shape
        s, p = self.stride, self.padding
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        # (N, C, Ho, Wo, kh, kw): a view of every window, no copy yet.
        windows = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::s, ::s]
        n, c, ho, wo = windows.shape[:4]
        # im2col with one column per output pixel, (C*kh*kw, N*Ho*Wo): the copy then runs along image
        # rows in memory order, where one row per output pixel would gather scattered windows.
        self.cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * ho * wo)
        self.xp_shape, self.pad, self.out_hw = xp.shape, p, (ho, wo)
        out = w.reshape(out_c, -1) @ self.cols
        if "bias" in self.params:
            out += self.params["bias"][:, None]
        return np.ascontiguousarray(out.reshape(out_c, n, ho, wo).transpose(1, 0, 2, 3))

    def backward(self, dout):
        w = self.params["weight"]
        out_c, c, kh, kw = w.shape
        s, p = self.stride, self.padding
        n, (ho, wo) = dout.shape[0], self.out_hw
        dout_mat = dout.transpose(1, 0, 2, 3).reshape(out_c, n * ho * wo)
        self.grads["weight"] = (dout_mat @ self.cols.T).reshape(w.shape)
        if "bias" in self.params:
            self.grads["bias"] = dout_mat.sum(axis=1)
        dcols = (w.reshape(out_c, -1).T @ dout_mat).reshape(c, kh, kw, n, ho, wo)
        # col2im: each kernel offset (i, j) adds its slice back onto the input positions it read.
        # A loop over the kh*kw offsets, never over pixels or images; accumulated as (C, N, H, W).
        n_, c_, hp, wp = self.xp_shape
        dxp = np.zeros((c_, n_, hp, wp), dtype=dout.dtype)
        for i in range(kh):
            for j in range(kw):
                dxp[:, :, i : i + s * ho : s, j : j + s * wo : s] += dcols[:, i, j]
        dxp = dxp[:, :, p : hp - p, p : wp - p] if p else dxp
        return np.ascontiguousarray(dxp.transpose(1, 0, 2, 3))


class MaxPool2d(Layer):
    """Maximum over each window; the gradient goes to the first maximum of a window, as in torch."""

    def __init__(self, kernel_size: int, stride: int | None = None):
        super().__init__()
        self.k, self.s = kernel_size, stride or kernel_size

    def _offsets(self, x, out_hw):
        """The k*k strided slices of x, one per window offset (i, j): slice[n, c, h, w] = x[n, c, h*s + i, w*s + j]."""
        k, s = self.k, self.s
        ho, wo = out_hw
        for i in range(k):
            for j in range(k):
                yield i, j, x[:, :, i : i + s * ho : s, j : j + s * wo : s]

    def forward(self, x):
        k, s = self.k, self.s
        out_hw = ((x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1)
        out = None
        for _, _, part in self._offsets(x, out_hw):
            out = part.copy() if out is None else np.maximum(out, part, out=out)
        self.x, self.out = x, out
        return out

    def backward(self, dout):
        s, (ho, wo) = self.s, self.out.shape[2:]
        dx = np.zeros_like(self.x, dtype=dout.dtype)
        taken = np.zeros(self.out.shape, dtype=bool)
        # Offsets in row-major order, so the first maximum of a window gets the gradient (torch's rule).
        for i, j, part in self._offsets(self.x, (ho, wo)):
            winner = (part == self.out) & ~taken
            taken |= winner
            dx[:, :, i : i + s * ho : s, j : j + s * wo : s] += dout * winner
        return dx


class AvgPool2d(Layer):
    """Mean over each window."""

    def __init__(self, kernel_size: int, stride: int | None = None):
        super().__init__()
        self.k, self.s = kernel_size, stride or kernel_size

    def forward(self, x):
        k, s = self.k, self.s
        self.x_shape = x.shape
        return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::s, ::s].mean(axis=(-2, -1))

    def backward(self, dout):
        k, s = self.k, self.s
        ho, wo = dout.shape[2:]
        dx = np.zeros(self.x_shape, dtype=dout.dtype)
        share = dout / (k * k)
        for i in range(k):
            for j in range(k):
                dx[:, :, i : i + s * ho : s, j : j + s * wo : s] += share
        return dx


class GlobalAvgPool2d(Layer):
    """Mean over all positions: (N, C, H, W) -> (N, C, 1, 1), like torch's AdaptiveAvgPool2d(1)."""

    def forward(self, x):
        self.x_shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, dout):
        h, w = self.x_shape[2:]
        return np.broadcast_to(dout / (h * w), self.x_shape).copy()


class ReLU(Layer):
    def forward(self, x):
        self.out = np.maximum(x, 0)
        return self.out

    def backward(self, dout):
        return dout * (self.out > 0)


class Sigmoid(Layer):
    """sigma(x) = 1 / (1 + e^-x), computed without overflow for large |x|; sigma' = sigma (1 - sigma)."""

    def forward(self, x):
        self.out = sigmoid(x)
        return self.out

    def backward(self, dout):
        return dout * self.out * (1 - self.out)


def sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


class Flatten(Layer):
    def forward(self, x):
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self.x_shape)


class Dropout(Layer):
    """Inverted dropout: zero a share p of the inputs in training and scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        self.p, self.rng = p, rng or np.random.default_rng()

    def forward(self, x):
        if not self.training or self.p == 0:
            self.scale = None
            return x
        self.scale = (self.rng.random(x.shape) >= self.p) / (1 - self.p)
        return x * self.scale

    def backward(self, dout):
        return dout if self.scale is None else dout * self.scale


class BatchNorm2d(Layer):
    """Per-channel normalization, x_hat = (x - mean) / sqrt(var + eps), then y = weight * x_hat + bias.

    Training uses the batch's statistics (biased variance) and updates the running averages
    (unbiased variance, as torch); evaluation uses the running averages.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, dtype=np.float64):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.params = {"weight": np.ones(num_features, dtype), "bias": np.zeros(num_features, dtype)}
        self.buffers = {"running_mean": np.zeros(num_features, dtype), "running_var": np.ones(num_features, dtype)}

    def forward(self, x):
        w, b = self.params["weight"], self.params["bias"]
        if self.training:
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            m = x.size // x.shape[1]
            self.buffers["running_mean"] *= 1 - self.momentum
            self.buffers["running_mean"] += self.momentum * mean
            self.buffers["running_var"] *= 1 - self.momentum
            self.buffers["running_var"] += self.momentum * var * m / max(m - 1, 1)
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        self.x, self.mean = x, mean
        self.inv_std = (1 / np.sqrt(var + self.eps)).astype(x.dtype)
        # y = weight * (x - mean) * inv_std + bias, folded into one scale and one shift per channel.
        scale = w * self.inv_std
        return x * scale[None, :, None, None] + (b - mean * scale)[None, :, None, None]

    def backward(self, dout):
        inv_std = self.inv_std[None, :, None, None]
        x_hat = (self.x - self.mean[None, :, None, None]) * inv_std
        self.grads["weight"] = (dout * x_hat).sum(axis=(0, 2, 3))
        self.grads["bias"] = dout.sum(axis=(0, 2, 3))
        dx_hat = dout * self.params["weight"][None, :, None, None]
        if not self.training:
            return dx_hat * inv_std  # the statistics are constants
        # The batch mean and variance depend on every input of the channel, hence the two extra terms.
        mean_dx_hat = dx_hat.mean(axis=(0, 2, 3), keepdims=True)
        mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=(0, 2, 3), keepdims=True)
        return inv_std * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)


class Container(Layer):
    """A layer made of named child layers: its params, grads and buffers are theirs, under dotted
    names (`features.0.weight`), so that torch state dicts map onto it."""

    def __init__(self):
        pass  # owns no arrays of its own: the properties below gather the children's

    def children(self) -> list[tuple[str, Layer]]:
        raise NotImplementedError

    @property
    def params(self):
        return self._gather("params")

    @property
    def grads(self):
        return self._gather("grads")

    @property
    def buffers(self):
        return self._gather("buffers")

    def _gather(self, attr: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.{name}": value
            for prefix, layer in self.children()
            for name, value in getattr(layer, attr).items()
        }

    def train(self, mode: bool = True):
        self.training = mode
        for _, layer in self.children():
            layer.train(mode)
        return self

    def load_state_dict(self, state):
        _check_names(self.state_dict(), state)
        for prefix, layer in self.children():
            layer.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})


class Sequential(Container):
    """Layers applied in order, named by position as in torch's nn.Sequential."""

    def __init__(self, *layers: Layer):
        self.layers = list(layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def __getitem__(self, i: int) -> Layer:
        return self.layers[i]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout
