"""Losses: `forward(pred, target) -> float` keeps what `backward() -> dpred` needs."""

from __future__ import annotations

import numpy as np

from pneumo.reference.layers import sigmoid


class BCELoss:
    """Binary cross-entropy on probabilities p, averaged over the elements.

    The negative log-likelihood of Bernoulli targets y: -[y log p + (1 - y) log(1 - p)]. Each log is
    floored at -100, as torch does, so that p = 0 or 1 gives a large finite loss.
    """

    def forward(self, p: np.ndarray, y: np.ndarray) -> float:
        self.p, self.y = p, y
        with np.errstate(divide="ignore"):  # log(0) = -inf, floored just below
            log_p, log_1mp = np.maximum(np.log(p), -100), np.maximum(np.log(1 - p), -100)
        return float(-np.mean(y * log_p + (1 - y) * log_1mp))

    def backward(self) -> np.ndarray:
        p, y = self.p, self.y
        return (p - y) / np.maximum(p * (1 - p), 1e-12) / p.size


class BCEWithLogitsLoss:
    """BCE on logits z, with p = sigmoid(z) folded in for numerical stability; pos_weight w scales
    the positive term: -[w y log sigma(z) + (1 - y) log(1 - sigma(z))], averaged.

    With log sigma(z) = -softplus(-z) and log(1 - sigma(z)) = -z - softplus(-z), the loss is
    (1 - y) z + (1 + (w - 1) y) softplus(-z), and its gradient is (1 - y) - (1 + (w - 1) y) sigma(-z).
    """

    def __init__(self, pos_weight: float | np.ndarray | None = None):
        self.pos_weight = pos_weight

    def forward(self, z: np.ndarray, y: np.ndarray) -> float:
        self.z, self.y = z, y
        self.log_weight = 1 + (self.pos_weight - 1) * y if self.pos_weight is not None else np.ones_like(z)
        softplus_neg_z = np.logaddexp(0, -z)
        return float(np.mean((1 - y) * z + self.log_weight * softplus_neg_z))

    def backward(self) -> np.ndarray:
        return ((1 - self.y) - self.log_weight * sigmoid(-self.z)) / self.z.size


class MSELoss:
    """The notes' squared error, E = 1/2 sum (target - output)^2 (a sum, not a mean); dE/dout = out - target."""

    def forward(self, out: np.ndarray, target: np.ndarray) -> float:
        self.diff = out - target
        return float(0.5 * np.sum(self.diff**2))

    def backward(self) -> np.ndarray:
        return self.diff.copy()
