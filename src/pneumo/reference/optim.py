"""Gradient descent on a layer's `params`, in place, from its `grads`."""

from __future__ import annotations

import numpy as np

from pneumo.reference.layers import Layer


class SGD:
    """theta <- theta - lr * v, with v <- momentum * v + grad (v = grad on the first step), as torch."""

    def __init__(self, model: Layer, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.model, self.lr, self.momentum, self.weight_decay = model, lr, momentum, weight_decay
        self.velocity: dict[str, np.ndarray] = {}

    def step(self) -> None:
        grads = self.model.grads
        for name, p in self.model.params.items():
            g = grads[name] + self.weight_decay * p if self.weight_decay else grads[name]
            if self.momentum:
                v = self.velocity.get(name)
                v = g.copy() if v is None else self.momentum * v + g
                self.velocity[name] = g = v
            p -= self.lr * g


class Adam:
    """Adam (Kingma and Ba): bias-corrected running means of the gradient and its square."""

    def __init__(
        self, model: Layer, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
    ):
        self.model, self.lr, self.betas, self.eps, self.weight_decay = model, lr, betas, eps, weight_decay
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        grads = self.model.grads
        for name, p in self.model.params.items():
            g = grads[name] + self.weight_decay * p if self.weight_decay else grads[name]
            m = self.m[name] = b1 * self.m.get(name, 0) + (1 - b1) * g
            v = self.v[name] = b2 * self.v.get(name, 0) + (1 - b2) * g * g
            m_hat = m / (1 - b1**self.t)
            v_hat = v / (1 - b2**self.t)
            p -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
