"""The worked examples of ../shared/course-notes, with expected values derived here, not copied:
the notes' printed numbers are partly garbled."""

import math

import numpy as np
import pytest

from pneumo import reference as nnp

KERNEL = np.array([[2, 0, -2], [0, 2, 0], [-2, 0, 2]], dtype=float)


def lecture_000_input(bottom_right: float) -> np.ndarray:
    # The slide prints a 5x5 input whose bottom-right entry is lost in extraction.
    return np.array(
        [[5, 1, 0, 1, 0], [1, 6, 1, 7, 0], [4, 1, 6, 3, 5], [1, 8, 0, 0, 1], [2, 2, 8, 0, bottom_right]], dtype=float
    )


def conv(x: np.ndarray) -> np.ndarray:
    layer = nnp.Conv2d(1, 1, 3, bias=False)
    layer.params["weight"][0, 0] = KERNEL
    return layer.forward(x[None, None])[0, 0]


def test_lecture_000_convolution():
    x = lecture_000_input(5)
    out = conv(x)
    # The slide works the first entry by hand: 5*2 + 1*0 + 0*(-2) + 1*0 + 6*2 + 1*0 + 4*(-2) + 1*0 + 6*2 = 26.
    assert out[0, 0] == 26
    # Every entry by the definition, as a sum of 9 products.
    by_definition = np.array([[np.sum(x[i : i + 3, j : j + 3] * KERNEL) for j in range(3)] for i in range(3)])
    assert np.array_equal(out, by_definition)
    assert np.array_equal(out, [[26, 6, 12], [0, -6, 10], [24, -8, -4]])
    # The slide's printed 26, 6, 0, 24 agree; its -6, -4, 8, -14 in the other places are garbled.
    # Only the last entry uses the missing input m: it is 2m - 14, so the printed -4 means m = 5.
    assert conv(lecture_000_input(0))[2, 2] == -14 and conv(lecture_000_input(1))[2, 2] == -12


def mazur_network():
    """Note 004's 2-2-2 sigmoid network, w1..w8 = 0.15..0.55; the notes share one bias per layer
    (b1 = 0.35, b2 = 0.60), which here is each neuron's bias starting at that value."""
    net = nnp.Sequential(nnp.Linear(2, 2), nnp.Sigmoid(), nnp.Linear(2, 2), nnp.Sigmoid())
    net[0].params["weight"][:] = [
        [0.15, 0.20],
        [0.25, 0.30],
    ]  # net_h1 = w1 i1 + w2 i2 + b1, net_h2 = w3 i1 + w4 i2 + b1
    net[0].params["bias"][:] = 0.35
    net[2].params["weight"][:] = [
        [0.40, 0.45],
        [0.50, 0.55],
    ]  # net_o1 = w5 h1 + w6 h2 + b2, net_o2 = w7 h1 + w8 h2 + b2
    net[2].params["bias"][:] = 0.60
    return net


def by_hand(lr=0.5):
    """The same step with the chain rule written out in scalars, as note 004 does it."""
    s = lambda v: 1 / (1 + math.exp(-v))
    i1, i2, t1, t2 = 0.05, 0.10, 0.01, 0.99
    w1, w2, w3, w4, w5, w6, w7, w8, b1, b2 = 0.15, 0.20, 0.25, 0.30, 0.40, 0.45, 0.50, 0.55, 0.35, 0.60
    h1, h2 = s(w1 * i1 + w2 * i2 + b1), s(w3 * i1 + w4 * i2 + b1)
    o1, o2 = s(w5 * h1 + w6 * h2 + b2), s(w7 * h1 + w8 * h2 + b2)
    error = 0.5 * (t1 - o1) ** 2 + 0.5 * (t2 - o2) ** 2
    d_o1, d_o2 = (o1 - t1) * o1 * (1 - o1), (o2 - t2) * o2 * (1 - o2)  # dE/dnet_o
    d_h1 = (d_o1 * w5 + d_o2 * w7) * h1 * (1 - h1)  # dE/dnet_h: the error sent back through w5, w7
    d_h2 = (d_o1 * w6 + d_o2 * w8) * h2 * (1 - h2)
    new = {
        "w1": w1 - lr * d_h1 * i1,
        "w2": w2 - lr * d_h1 * i2,
        "w3": w3 - lr * d_h2 * i1,
        "w4": w4 - lr * d_h2 * i2,
        "w5": w5 - lr * d_o1 * h1,
        "w6": w6 - lr * d_o1 * h2,
        "w7": w7 - lr * d_o2 * h1,
        "w8": w8 - lr * d_o2 * h2,
    }
    return error, (h1, h2, o1, o2), new


def test_note_004_one_backpropagation_step():
    net, loss = mazur_network(), nnp.MSELoss()
    x, target = np.array([[0.05, 0.10]]), np.array([[0.01, 0.99]])
    out = net.forward(x)
    error = loss.forward(out, target)
    net.backward(loss.backward())
    nnp.SGD(net, lr=0.5).step()

    expected_error, (h1, h2, o1, o2), new = by_hand()
    assert net[1].out[0] == pytest.approx([h1, h2], abs=1e-15)
    assert out[0] == pytest.approx([o1, o2], abs=1e-15)
    assert error == pytest.approx(expected_error, abs=1e-15)
    got = {
        **dict(zip(["w1", "w2", "w3", "w4"], net[0].params["weight"].ravel(), strict=True)),
        **dict(zip(["w5", "w6", "w7", "w8"], net[2].params["weight"].ravel(), strict=True)),
    }
    for name, value in new.items():
        assert value == pytest.approx(got[name], abs=1e-15), name

    # The rounded figures the notes print (the notes' own steps round early: 0.74 * 0.186 * 0.6 = 0.082).
    assert error == pytest.approx(0.298371109, abs=1e-9)
    assert (h1, o1, o2) == pytest.approx((0.593269992, 0.75136507, 0.772928465), abs=1e-8)
    printed = {
        "w5": 0.35891648,
        "w6": 0.408666186,
        "w7": 0.511301270,
        "w8": 0.561370121,
        "w1": 0.149780716,
        "w2": 0.19956143,
        "w3": 0.24975114,
        "w4": 0.29950229,
    }
    for name, value in printed.items():
        assert got[name] == pytest.approx(value, abs=1e-8), name


def test_a_2_2_1_network_learns_xor():
    rng = np.random.default_rng(3)
    net = nnp.Sequential(nnp.Linear(2, 2, rng=rng), nnp.Sigmoid(), nnp.Linear(2, 1, rng=rng), nnp.Sigmoid())
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    y = np.array([[0], [1], [1], [0]], dtype=float)
    loss, opt = nnp.BCELoss(), nnp.SGD(net, lr=2.0, momentum=0.9)
    for _ in range(2000):
        loss.forward(net.forward(x), y)
        net.backward(loss.backward())
        opt.step()
    out = net.forward(x)
    assert np.array_equal(out > 0.5, y > 0.5), out.ravel()
    assert loss.forward(out, y) < 0.05
