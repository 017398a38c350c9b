import numpy as np
import torch


def rel_error(a, b) -> float:
    """max |a - b| / (|a| + |b|), elementwise, the denominator floored at 1e-8 (CS231n's check)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b)))) if a.size else 0.0


def norm_rel_error(a, b) -> float:
    """||a - b|| / (||a|| + ||b||): the usual measure for numerical gradient checks, whose absolute
    noise (about 1e-10 here) would swamp an elementwise ratio on tiny entries."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300))


def t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float64))


def copy_params_to_torch(layer, module) -> None:
    with torch.no_grad():
        for name, value in layer.state_dict().items():
            module.get_parameter(name).copy_(t(value)) if name in dict(
                module.named_parameters()
            ) else module.get_buffer(name).copy_(t(value))


def numerical_gradient(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + h e_i) - f(x - h e_i)) / 2h for every entry of x, changed in place and restored."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad
