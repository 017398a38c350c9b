import numpy as np
import pytest
import torch

from pneumo import reference as nnp
from reference.helpers import copy_params_to_torch, norm_rel_error, numerical_gradient, rel_error, t


def loss_cases(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 6, size=rng.integers(1, 3)))
    y = (rng.random(shape) < 0.5).astype(float)
    p = rng.uniform(0.02, 0.98, shape)
    z = rng.normal(0, 4, shape)
    pw = float(rng.uniform(0.2, 4))
    return [
        ("BCELoss", nnp.BCELoss(), torch.nn.BCELoss(), p, y),
        ("BCEWithLogitsLoss", nnp.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss(), z, y),
        (
            "BCEWithLogitsLoss-pos_weight",
            nnp.BCEWithLogitsLoss(pos_weight=pw),
            torch.nn.BCEWithLogitsLoss(pos_weight=t(pw)),
            z,
            y,
        ),
        (
            "MSELoss-half-sum",
            nnp.MSELoss(),
            lambda a, b: 0.5 * torch.nn.functional.mse_loss(a, b, reduction="sum"),
            rng.normal(size=shape),
            rng.normal(size=shape),
        ),
    ]


LOSS_IDS = [(seed, i) for seed in range(6) for i in range(4)]


@pytest.mark.parametrize("ids", LOSS_IDS, ids=lambda ids: f"{loss_cases(ids[0])[ids[1]][0]}-{ids[0]}")
def test_losses_match_torch_and_central_differences(ids):
    name, loss, torch_loss, pred, target = loss_cases(ids[0])[ids[1]]
    value = loss.forward(pred, target)
    dpred = loss.backward()
    pt = t(pred).requires_grad_()
    expected = torch_loss(pt, t(target))
    expected.backward()
    assert rel_error(value, expected.item()) < 1e-8
    assert rel_error(dpred, pt.grad.numpy()) < 1e-8
    assert norm_rel_error(dpred, numerical_gradient(lambda: loss.forward(pred, target), pred)) < 1e-7


def test_bce_with_logits_is_stable_for_huge_logits():
    loss = nnp.BCEWithLogitsLoss()
    z, y = np.array([1000.0, -1000.0, 1000.0]), np.array([1.0, 0.0, 0.0])
    assert loss.forward(z, y) == pytest.approx(1000 / 3)
    assert np.isfinite(loss.backward()).all()
    assert nnp.BCELoss().forward(np.array([0.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(
        100.0
    )  # torch's log floor


def test_bce_is_the_bernoulli_negative_log_likelihood():
    # Notes 000: maximizing prod p^y (1-p)^(1-y) is minimizing the mean of -[y log p + (1-y) log(1-p)].
    p, y = np.array([0.9, 0.2, 0.6]), np.array([1.0, 0.0, 1.0])
    likelihood = np.prod(p**y * (1 - p) ** (1 - y))
    assert nnp.BCELoss().forward(p, y) == pytest.approx(-np.log(likelihood) / 3)
    # Through a sigmoid the gradient simplifies to p - y (per element, before the mean).
    z = np.log(p / (1 - p))
    loss = nnp.BCEWithLogitsLoss()
    loss.forward(z, y)
    assert np.allclose(loss.backward() * 3, p - y)


@pytest.mark.parametrize(
    "make, make_torch",
    [
        (lambda m: nnp.SGD(m, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            lambda m: nnp.SGD(m, lr=0.05, momentum=0.9, weight_decay=0.01),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        ),
        (lambda m: nnp.Adam(m, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
        (
            lambda m: nnp.Adam(m, lr=0.02, betas=(0.8, 0.99), weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), weight_decay=0.1),
        ),
    ],
    ids=["sgd", "sgd-momentum", "adam", "adam-options"],
)
def test_optimizers_match_torch(make, make_torch):
    rng = np.random.default_rng(0)
    model = nnp.Sequential(nnp.Linear(4, 3, rng=rng), nnp.Sigmoid(), nnp.Linear(3, 1, rng=rng))
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1)).double()
    copy_params_to_torch(model, module)
    opt, opt_t = make(model), make_torch(module.parameters())
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(8, 1))
    loss, loss_t = nnp.MSELoss(), torch.nn.MSELoss(reduction="sum")
    for _ in range(5):
        loss.forward(model.forward(x), y)
        model.backward(loss.backward())
        opt.step()
        opt_t.zero_grad()
        (0.5 * loss_t(module(t(x)), t(y))).backward()
        opt_t.step()
    for name, value in model.params.items():
        assert rel_error(value, module.get_parameter(name).detach().numpy()) < 1e-8, name
