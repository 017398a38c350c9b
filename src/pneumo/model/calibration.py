"""Probability calibration: a monotone map of the model's logit z to calibrated_logit = scale * z + bias.

Platt scaling fits both numbers by maximum likelihood (logistic regression on the logit); temperature
scaling fits the scale alone. Being monotone, calibration changes probabilities, never the ranking, so
AUC and the decisions at a re-chosen threshold stay as they were on the data it was fitted on.

Fits are penalized towards the identity (scale 1, bias 0) with `prior` pseudo-observations' weight and
use Platt's smoothed targets, so that a small sample, or one the model separates perfectly, gives a
finite, cautious map instead of an infinite slope.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METHODS = ("platt", "temperature", "none")
MIN_SCALE = 1e-3  # the flattest map a fit gives: calibration keeps a ranking, never turns it round


@dataclass(frozen=True)
class Calibration:
    method: str = "none"
    scale: float = 1.0
    bias: float = 0.0

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits, dtype=np.float64) * self.scale + self.bias

    def then(self, after: Calibration) -> Calibration:
        """This map followed by `after`, as one map."""
        return Calibration(after.method, after.scale * self.scale, after.scale * self.bias + after.bias)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """A stored calibration, checked against its meaning: a known method, a finite positive scale
        (zero gives one answer for every image, a negative one inverts the model) and a finite bias."""
        method, scale, bias = d.get("method", "none"), d.get("scale", 1.0), d.get("bias", 0.0)
        if method not in METHODS:
            raise ValueError(f"calibration method {method!r} is none of {', '.join(METHODS)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (scale, bias)):
            raise ValueError(f"calibration scale and bias must be numbers, found {scale!r} and {bias!r}")
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(bias)):
            raise ValueError(f"calibration scale {scale} must be finite and positive, its bias {bias} finite")
        return cls(method, float(scale), float(bias))


def fit(logits: np.ndarray, labels: np.ndarray, method: str = "platt", prior: float = 0.0) -> Calibration:
    """The calibration of `method` that best explains `labels` (0/1) from `logits`."""
    if method == "none":
        return Calibration()
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    # Platt (1999): targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2) instead of 1 and 0.
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    scale, bias = _newton(z, t, fit_bias=method == "platt", prior=prior)
    if scale < MIN_SCALE:
        # Logits that rank no better than chance, or the wrong way round: the best increasing map is
        # flat, at the base rate. A negative scale would turn the model round; checkpoints refuse one.
        base_rate = float(t.mean())
        scale, bias = MIN_SCALE, (float(np.log(base_rate / (1 - base_rate))) if method == "platt" else 0.0)
    return Calibration(method, scale, bias)


def _newton(z: np.ndarray, t: np.ndarray, fit_bias: bool, prior: float, steps: int = 100) -> tuple[float, float]:
    """Minimize the summed cross-entropy CE(sigmoid(a z + b), t) + prior / 2 * ((a - 1)^2 + b^2) by
    Newton's method, halving any step that does not lower it (the loss is convex, so this converges)."""
    features = np.stack([z, np.ones_like(z)], 1) if fit_bias else z[:, None]
    centre = np.array([1.0, 0.0])[: features.shape[1]]
    ridge = prior + 1e-6  # a hair of ridge keeps the Hessian invertible on degenerate data

    def loss(theta):
        u = features @ theta
        # CE(sigmoid(u), t) = softplus(u) - t u, computed stably
        return float(np.sum(np.logaddexp(0, u) - t * u) + ridge / 2 * np.sum((theta - centre) ** 2))

    theta = centre.copy()
    current = loss(theta)
    for _ in range(steps):
        p = _sigmoid(features @ theta)
        grad = features.T @ (p - t) + ridge * (theta - centre)
        hess = (features * (p * (1 - p))[:, None]).T @ features + ridge * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-8 and loss(theta - size * step) > current:
            size /= 2
        theta = theta - size * step
        new = loss(theta)
        if current - new < 1e-12 * max(1.0, abs(current)):
            break
        current = new
    return float(theta[0]), float(theta[1]) if fit_bias else 0.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def probabilities(logits: np.ndarray, calibration: Calibration) -> np.ndarray:
    return _sigmoid(calibration.apply(logits))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-15, 1 - 1e-15)
    return np.log(p) - np.log1p(-p)
