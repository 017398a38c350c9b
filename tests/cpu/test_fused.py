import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import conv_pool_relu_reference, folded_conv
from pneumo.cpu import fused, kernels
from pneumo.model.network import SmallCNN


def block(c_in: int, stride: int = 1, channels: int = 8, integer: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A block as SmallCNN builds it, with BatchNorm scales of both signs and a running mean away from
    zero (the fused statistics are summed relative to it)."""
    gen = torch.Generator().manual_seed(c_in)
    conv, bn = nn.Conv2d(c_in, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels)
    with torch.no_grad():
        if integer:
            conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape, generator=gen).float())
        else:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        bn.weight.copy_(torch.linspace(-1.5, 2.0, channels))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, channels))
        bn.running_mean.copy_(torch.linspace(-1, 1, channels))
    return conv.to(memory_format=torch.channels_last), bn


def forward_backward(conv, bn, x, grad, way: str):
    """The block's output, its parameters' gradients and BatchNorm's running statistics after one step:
    `way` is "stem" (all fused), "bn" (torch's convolution, the rest fused) or "torch"."""
    pool = nn.MaxPool2d(2)
    if way == "stem":
        assert fused.covers_stem(x, conv, bn, pool)
        out = fused.stem_block(x, conv, bn)
    elif way == "bn":
        y = conv(x)
        assert fused.covers(y, bn, pool)
        out = fused.bn_pool_relu(y, bn)
    else:
        out = torch.relu(pool(bn(conv(x))))
    (out * grad.to(out.dtype)).sum().backward()
    return out, conv.weight.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def images(c_in: int, integer: bool, seed: int = 1) -> torch.Tensor:
    """Three images, not square. Binary images through integer weights tie within most pooling windows,
    at positions whose inputs differ: the gradient must go where max_pool2d sends it (the first maximum
    of BatchNorm's output: the first minimum of the convolution's where BatchNorm's scale is negative)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (3, c_in, 40, 56)
    x = torch.randint(0, 2, shape, generator=gen).float() if integer else torch.randn(shape, generator=gen)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "way, c_in, stride", [("stem", 1, 1), ("stem", 1, 2), ("bn", 1, 2), ("bn", 4, 1)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
def test_the_fused_block_is_torchs_block_up_to_rounding(way, c_in, stride, integer):
    """Against torch's modules in float64: output, gradients, running statistics."""
    x = images(c_in, integer)
    conv, bn = block(c_in, stride, integer=integer)
    grad = torch.randn(3, 8, 40 // stride // 2, 56 // stride // 2, generator=torch.Generator().manual_seed(2))
    got = forward_backward(*copy.deepcopy((conv, bn)), x, grad, way)
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    want = forward_backward(conv64, bn64, x.double(), grad, "torch")
    names = ("output", "weight grad", "BN weight grad", "BN bias grad", "running mean", "running var")
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        error = (a.double() - b).abs().max() / b.abs().max()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_the_input_gradient_of_the_fused_bn_pool_relu():
    """What flows back into the convolution below: against torch in float64."""
    y = torch.randn(2, 8, 12, 16, generator=torch.Generator().manual_seed(3))
    y = y.contiguous(memory_format=torch.channels_last)
    _, bn = block(8)
    grad = torch.randn(2, 8, 6, 8, generator=torch.Generator().manual_seed(4))
    y32, y64 = y.clone().requires_grad_(), y.double().requires_grad_()
    (fused.bn_pool_relu(y32, copy.deepcopy(bn)) * grad).sum().backward()
    (torch.relu(nn.MaxPool2d(2)(copy.deepcopy(bn).double()(y64))) * grad).sum().backward()
    assert (y32.grad.double() - y64.grad).abs().max() / y64.grad.abs().max() < 1e-5


def test_the_first_blocks_gradients_hold_at_the_recipes_size():
    """At 224x224 the first block's weight gradient sums over a hundred thousand outputs per image,
    and BatchNorm's terms (from the input patches' sums and Gram matrix) nearly cancel the part routed
    through the pool: smooth images with an offset, like normalized X-rays, stress exactly that."""
    gen = torch.Generator().manual_seed(5)
    coarse = torch.rand(4, 1, 28, 28, generator=gen)
    x = (F.interpolate(coarse, size=224, mode="bilinear") * 3 - 1).contiguous(memory_format=torch.channels_last)
    conv, bn = block(1, 2, channels=16)
    grad = torch.randn(4, 16, 56, 56, generator=gen)
    got = forward_backward(*copy.deepcopy((conv, bn)), x, grad, "stem")
    want = forward_backward(copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), x.double(), grad, "torch")
    names = ("output", "weight grad", "BN weight grad", "BN bias grad", "running mean", "running var")
    for name, a, b in zip(names, got, want, strict=True):
        error = (a.double() - b).abs().max() / b.abs().max()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("way", ["stem", "bn"])
def test_running_statistics_and_step_count_update_as_batchnorms(way):
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    conv, bn = block(1, 2)
    fused_bn, plain_bn = copy.deepcopy(bn), copy.deepcopy(bn)
    for _ in range(3):
        if way == "stem":
            fused.stem_block(x, conv, fused_bn)
        else:
            fused.bn_pool_relu(conv(x), fused_bn)
        with torch.no_grad():
            plain_bn(conv(x))
    assert fused_bn.num_batches_tracked == plain_bn.num_batches_tracked == 3
    assert torch.allclose(fused_bn.running_mean, plain_bn.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fused_bn.running_var, plain_bn.running_var, rtol=1e-5, atol=1e-6)


def test_it_is_deterministic():
    x = torch.rand(5, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(5, 8, 12, 12, generator=torch.Generator().manual_seed(4))
    for way in ("stem", "bn"):
        first, second = (forward_backward(*block(1, 2), x, grad, way) for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@kernels(["fused"])
def test_a_training_step_of_smallcnn_is_the_same_fused_or_not(monkeypatch):
    # torch's convolutions on both sides: on Winograd's outputs one pooling window of this small network
    # holds two values close enough for BatchNorm's rounding to reorder them, so torch's pool (after
    # BatchNorm) and the fused one (before it) route that window's gradient to different positions:
    # two valid subgradients, and a difference this test is not about.
    torch.manual_seed(0)
    model = SmallCNN([8, 16, 32], stem_stride=2, dropout=0.0).to(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0.0, 1, 1, 0, 1, 0])

    def step(net):
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        stats = [m.running_var.clone() for m in net.features if isinstance(m, nn.BatchNorm2d)]
        return loss.detach(), {n: p.grad for n, p in net.named_parameters()}, stats

    calls = []

    def counted(name):
        run = getattr(fused, name)
        return lambda *args: calls.append(name) or run(*args)

    for name in ("stem_block", "bn_pool_relu"):
        monkeypatch.setattr(fused, name, counted(name))
    fast = step(copy.deepcopy(model))
    assert calls == ["stem_block", "bn_pool_relu", "bn_pool_relu"]
    with kernels(False):
        plain = step(copy.deepcopy(model))
    assert torch.allclose(fast[0], plain[0], rtol=1e-5)
    for name, g in fast[1].items():
        assert torch.allclose(g, plain[1][name], rtol=1e-3, atol=1e-5 * plain[1][name].abs().max()), name
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(fast[2], plain[2], strict=True))


def test_it_covers_only_a_training_step_it_can_run():
    conv, bn = block(1, 2)
    pool = nn.MaxPool2d(2)
    x = torch.rand(2, 1, 32, 32)
    y = conv(x)
    assert fused.covers_stem(x, conv, bn, pool) and fused.covers(y, bn, pool)
    assert not fused.covers_stem(torch.rand(2, 1, 30, 30), conv, bn, pool)  # odd output (15): pooling drops a row
    assert not fused.covers(y[..., :15], bn, pool)
    assert not fused.covers_stem(x.double(), conv, bn, pool)
    assert not fused.covers_stem(x.clone().requires_grad_(), conv, bn, pool)  # no input gradient computed
    with torch.no_grad():
        assert not fused.covers_stem(x, conv, bn, pool) and not fused.covers(y, bn, pool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.covers_stem(x, conv, bn, pool) and not fused.covers(y, bn, pool)
    assert not fused.covers(y, copy.deepcopy(bn).eval(), pool)
    assert not fused.covers(y, nn.BatchNorm2d(8, momentum=None), pool)
    assert not fused.covers(y, nn.BatchNorm2d(8, affine=False), pool)
    assert not fused.covers(y, bn, nn.MaxPool2d(3))
    assert not fused.covers_stem(x, nn.Conv2d(1, 8, 3, 2, 1, bias=True), bn, pool)
    assert not fused.covers_stem(x, nn.Conv2d(1, 8, 5, 2, 2, bias=False), bn, pool)
    assert not fused.covers_stem(torch.rand(2, 3, 32, 32), nn.Conv2d(3, 8, 3, 2, 1, bias=False), bn, pool)


def test_without_numba_the_standard_modules_run(monkeypatch):
    monkeypatch.setattr(fused, "kernels", lambda: None)
    conv, bn = block(1, 2)
    x = torch.rand(2, 1, 32, 32)
    assert not fused.covers_stem(x, conv, bn, nn.MaxPool2d(2)) and not fused.covers(conv(x), bn, nn.MaxPool2d(2))
    model = SmallCNN([4, 8], stem_stride=2)
    model(x).sum().backward()
    assert model.features[0].weight.grad is not None


@pytest.mark.parametrize(
    "h, w, stride", [(224, 224, 2), (40, 56, 2), (9, 7, 2), (3, 3, 2), (10, 11, 1), (13, 16, 3)], ids=lambda v: str(v)
)
def test_the_inference_stem_is_torchs_first_block_up_to_rounding(h, w, stride):
    """The recipe's size, odd and unequal sides (pooling drops the last row or column), the smallest input
    that leaves something to pool, and other strides."""
    conv = folded_conv(1, 8, stride, seed=stride)
    x = torch.randn(3, 1, h, w, generator=torch.Generator().manual_seed(h)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        assert fused.covers_inference_stem(x, conv, nn.Identity(), nn.MaxPool2d(2))
        out = fused.inference_stem(x, conv)
    expected = conv_pool_relu_reference(x, conv)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert (expected > 0).any() and (expected == 0).any()  # the ReLU had work to do


def test_the_inference_stem_makes_nan_exactly_where_torch_does():
    conv = folded_conv(1, 8, 2, seed=2)
    x = torch.rand(2, 1, 20, 20)
    x[1, 0, 7, 12] = float("nan")
    with torch.inference_mode():
        out = fused.inference_stem(x, conv)
    expected = conv_pool_relu_reference(x, conv)
    assert expected.isnan().any() and torch.equal(out.isnan(), expected.isnan())


def test_the_inference_stem_covers_only_inference_of_a_folded_first_block(monkeypatch):
    conv, x, pool = folded_conv(1, 8, 2, seed=2), torch.rand(2, 1, 32, 32), nn.MaxPool2d(2)
    with torch.inference_mode():
        assert fused.covers_inference_stem(x, conv, nn.Identity(), pool)
        assert not fused.covers_inference_stem(x, conv, nn.BatchNorm2d(8), pool)  # not folded
        assert not fused.covers_inference_stem(x, nn.Conv2d(1, 8, 3, 2, 1, bias=False), nn.Identity(), pool)
        assert not fused.covers_inference_stem(x, nn.Conv2d(1, 8, 3, (2, 1), 1), nn.Identity(), pool)
        assert not fused.covers_inference_stem(torch.rand(2, 2, 32, 32), nn.Conv2d(2, 8, 3, 2, 1), nn.Identity(), pool)
        assert not fused.covers_inference_stem(x.double(), conv, nn.Identity(), pool)
        assert not fused.covers_inference_stem(x, conv, nn.Identity(), nn.MaxPool2d(2, ceil_mode=True))
        assert not fused.covers_inference_stem(x[..., :2, :], conv, nn.Identity(), pool)  # a 1-row output
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused.covers_inference_stem(x, conv, nn.Identity(), pool)
        monkeypatch.setattr(fused, "kernels", lambda: None)  # numba missing: torch's operators
        assert not fused.covers_inference_stem(x, conv, nn.Identity(), pool)
    monkeypatch.undo()
    assert not fused.covers_inference_stem(x, conv, nn.Identity(), pool)  # autograd on
