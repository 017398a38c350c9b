"""Every NumPy layer against torch autograd (float64, random shapes), and against its own numerical gradient."""

import numpy as np
import pytest
from torch import nn

from pneumo import reference as nnp
from reference.helpers import copy_params_to_torch, norm_rel_error, numerical_gradient, rel_error, t

TOL = 1e-8


def random_cases(seed: int):
    rng = np.random.default_rng(seed)
    n, c, o = rng.integers(1, 5), rng.integers(1, 5), rng.integers(1, 6)
    k = int(rng.integers(1, 6))
    stride, padding = int(rng.integers(1, 4)), int(rng.integers(0, 3))
    h, w = int(rng.integers(k, 13)), int(rng.integers(k, 13))
    pool_k = int(rng.integers(1, 4))
    pool_s = int(rng.integers(1, 4))
    lrng = np.random.default_rng(seed + 100)
    return [
        (f"Linear-{seed}", nnp.Linear(c * 3, o, rng=lrng), nn.Linear(c * 3, o).double(), (n, c * 3)),
        (
            f"Conv2d-{seed}",
            nnp.Conv2d(c, o, k, stride, padding, rng=lrng),
            nn.Conv2d(c, o, k, stride, padding).double(),
            (n, c, h, w),
        ),
        (
            f"Conv2d-nobias-{seed}",
            nnp.Conv2d(c, o, 3, 2, 1, bias=False, rng=lrng),
            nn.Conv2d(c, o, 3, 2, 1, bias=False).double(),
            (n, c, h + 2, w + 2),
        ),
        (f"MaxPool2d-{seed}", nnp.MaxPool2d(pool_k, pool_s), nn.MaxPool2d(pool_k, pool_s), (n, c, h + 3, w + 3)),
        (f"AvgPool2d-{seed}", nnp.AvgPool2d(pool_k, pool_s), nn.AvgPool2d(pool_k, pool_s), (n, c, h + 3, w + 3)),
        (f"GlobalAvgPool2d-{seed}", nnp.GlobalAvgPool2d(), nn.AdaptiveAvgPool2d(1), (n, c, h, w)),
        (f"ReLU-{seed}", nnp.ReLU(), nn.ReLU(), (n, c, h, w)),
        (f"Sigmoid-{seed}", nnp.Sigmoid(), nn.Sigmoid(), (n, c, h)),
        (f"Flatten-{seed}", nnp.Flatten(), nn.Flatten(), (n, c, h, w)),
        (
            f"BatchNorm2d-{seed}",
            nnp.BatchNorm2d(c, eps=1e-5, momentum=0.1),
            nn.BatchNorm2d(c).double(),
            (n + 1, c, h, w),
        ),
        (
            f"Sequential-{seed}",
            # No conv bias before BatchNorm (as in pneumo's model): its gradient is exactly zero, and
            # comparing two roundings of zero says nothing.
            nnp.Sequential(
                nnp.Conv2d(c, o, 3, 1, 1, bias=False, rng=lrng),
                nnp.BatchNorm2d(o),
                nnp.ReLU(),
                nnp.MaxPool2d(2),
                nnp.Flatten(),
                nnp.Linear(o * (h // 2) * (w // 2), 1, rng=lrng),
                nnp.Sigmoid(),
            ),
            nn.Sequential(
                nn.Conv2d(c, o, 3, 1, 1, bias=False),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(o * (h // 2) * (w // 2), 1),
                nn.Sigmoid(),
            ).double(),
            (n + 1, c, max(h, 2), max(w, 2)),
        ),
    ]


CASE_IDS = [(seed, i) for seed in range(5) for i in range(len(random_cases(0)))]


def case(seed: int, i: int):
    """Fresh layers for every test: torch accumulates gradients, and BatchNorm updates its buffers."""
    return random_cases(seed)[i]


def case_name(ids) -> str:
    return random_cases(ids[0])[ids[1]][0]


def randomize_batchnorm(layer, rng):
    """BatchNorm starts as the identity; random scales, shifts and running stats test more."""
    for bn in (
        [layer]
        if isinstance(layer, nnp.BatchNorm2d)
        else [m for m in getattr(layer, "layers", []) if isinstance(m, nnp.BatchNorm2d)]
    ):
        bn.params["weight"][:] = rng.uniform(0.5, 2, bn.params["weight"].shape)
        bn.params["bias"][:] = rng.normal(size=bn.params["bias"].shape)
        bn.buffers["running_mean"][:] = rng.normal(size=bn.buffers["running_mean"].shape)
        bn.buffers["running_var"][:] = rng.uniform(0.5, 2, bn.buffers["running_var"].shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ids", CASE_IDS, ids=case_name)
def test_matches_torch(ids, training):
    name, layer, module, shape = case(*ids)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    randomize_batchnorm(layer, rng)
    copy_params_to_torch(layer, module)
    layer.train(training)
    module.train(training)
    x = rng.normal(size=shape)

    out = layer.forward(x)
    xt = t(x).requires_grad_()
    out_t = module(xt)
    assert rel_error(out, out_t.detach().numpy()) < TOL

    dout = rng.normal(size=out.shape)
    dx = layer.backward(dout)
    out_t.backward(t(dout))
    assert rel_error(dx, xt.grad.numpy()) < TOL
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    assert layer.grads.keys() == torch_grads.keys()
    for key, grad in layer.grads.items():
        assert rel_error(grad, torch_grads[key]) < TOL, key
    # Running statistics move (training) or stay (eval) exactly as torch's do.
    for key, value in layer.buffers.items():
        assert rel_error(value, module.get_buffer(key).numpy()) < TOL, key


@pytest.mark.parametrize("ids", CASE_IDS[:22], ids=case_name)
def test_gradients_match_central_differences(ids):
    name, layer, module, shape = case(*ids)
    rng = np.random.default_rng(7)
    randomize_batchnorm(layer, rng)
    layer.train(True)
    x = rng.normal(size=shape)
    out = layer.forward(x)
    project = rng.normal(size=out.shape)  # checks the gradient of a random scalar function of the output

    def f():
        saved = {k: v.copy() for k, v in layer.buffers.items()}
        value = float(np.sum(layer.forward(x) * project))
        for k, v in saved.items():
            layer.buffers[k][...] = v  # keep running stats from drifting during the probe
        return value

    layer.forward(x)
    dx = layer.backward(project)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    assert norm_rel_error(dx, numerical_gradient(f, x)) < 1e-7
    for key, p in layer.params.items():
        assert norm_rel_error(grads[key], numerical_gradient(f, p)) < 1e-7, key


def test_float32_is_allowed():
    layer = nnp.Conv2d(2, 3, 3, padding=1, dtype=np.float32, rng=np.random.default_rng(0))
    out = layer.forward(np.ones((1, 2, 5, 5), dtype=np.float32))
    assert out.dtype == np.float32
    assert layer.backward(np.ones_like(out)).dtype == np.float32


def test_dropout_scales_in_training_and_vanishes_in_eval():
    drop = nnp.Dropout(0.25, rng=np.random.default_rng(0))
    x = np.ones((200, 50))
    y = drop.forward(x)
    assert set(np.unique(y)) == {0.0, 1 / 0.75}
    assert abs((y == 0).mean() - 0.25) < 0.02
    assert np.array_equal(drop.backward(x), y)
    assert np.array_equal(drop.eval().forward(x), x)


def test_state_dict_round_trip_and_mismatch():
    a = nnp.Sequential(nnp.Conv2d(1, 2, 3), nnp.BatchNorm2d(2))
    b = nnp.Sequential(nnp.Conv2d(1, 2, 3), nnp.BatchNorm2d(2))
    assert set(a.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"0.weight": np.zeros((2, 1, 3, 3))})
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({**a.state_dict(), "0.weight": np.zeros((3, 1, 3, 3))})
