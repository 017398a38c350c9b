import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import conv_pool_relu_reference, folded_conv
from pneumo.cpu import fused, kernels, winograd
from pneumo.model.network import SmallCNN


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w",
    [(3, 16, 32, 56, 56), (2, 32, 64, 28, 28), (2, 64, 128, 14, 14), (2, 5, 7, 7, 9), (1, 1, 1, 2, 2)],
    ids=lambda v: str(v),
)
def test_the_winograd_block_is_the_direct_convolution_pooled_up_to_rounding(monkeypatch, n, c_in, c_out, h, w):
    """The recipe's three shapes, an edge that is no multiple of the 4x4 tiles (14), odd and unequal
    sides, the smallest input; chunks of one image, so that several chunks and a last one run."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)
    conv = folded_conv(c_in, c_out)
    x = torch.randn(n, c_in, h, w, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        assert winograd.covers(x, conv, nn.Identity(), nn.MaxPool2d(2))
        out = winograd.conv_pool_relu(x, conv)
    expected = conv_pool_relu_reference(x, conv)
    assert out.shape == expected.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert expected.numel() == 1 or ((expected > 0).any() and (expected == 0).any())  # the ReLU had work to do


def test_chunks_of_any_size_give_the_same_numbers(monkeypatch):
    conv = folded_conv(8, 16)
    x = torch.randn(7, 8, 20, 20, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = winograd.conv_pool_relu(x, conv)
        monkeypatch.setattr(winograd, "CHUNK_BYTES", 36 * 25 * 24 * 4 * 3)  # three images a chunk: 3, 3, 1
        assert torch.equal(winograd.conv_pool_relu(x, conv), whole)


def test_a_nan_in_the_input_is_never_hidden():
    """Winograd's transforms spread a NaN over its whole tile, so more outputs may be NaN than torch's;
    every output that torch makes NaN must be NaN here too, never a number."""
    conv = folded_conv(4, 4)
    x = torch.rand(1, 4, 12, 12)
    x[0, 2, 5, 6] = float("nan")
    with torch.inference_mode():
        out = winograd.conv_pool_relu(x, conv)
    expected = conv_pool_relu_reference(x, conv)
    assert expected.isnan().any() and out[expected.isnan()].isnan().all()


def test_a_changed_weight_is_transformed_again():
    conv = folded_conv(4, 4)
    x = torch.rand(1, 4, 8, 8)
    with torch.inference_mode():
        before = winograd.conv_pool_relu(x, conv)
    with torch.no_grad():
        conv.weight.mul_(-1)
    with torch.inference_mode():
        after = winograd.conv_pool_relu(x, conv)
    assert not torch.equal(before, after)
    expected = conv_pool_relu_reference(x, conv)
    assert (after.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_only_inference_of_a_folded_block_on_the_cpu_is_covered(monkeypatch):
    conv, x, pool = folded_conv(4, 8), torch.rand(2, 4, 8, 8), nn.MaxPool2d(2)
    with torch.inference_mode():
        assert winograd.covers(x, conv, nn.Identity(), pool)
        assert not winograd.covers(x, conv, nn.BatchNorm2d(8), pool)  # not folded
        assert not winograd.covers(x.double(), conv, nn.Identity(), pool)
        assert not winograd.covers(x, conv, nn.Identity(), nn.MaxPool2d(3))
        assert not winograd.covers(x, nn.Conv2d(4, 8, 3, 2, 1), nn.Identity(), pool)  # strided
        assert not winograd.covers(x, nn.Conv2d(4, 8, 3, 1, 1, bias=False), nn.Identity(), pool)
        assert not winograd.covers(x[..., :1, :], conv, nn.Identity(), pool)  # nothing to pool
        monkeypatch.setattr(winograd, "kernels", lambda: None)  # numba missing: torch's operators
        assert not winograd.covers(x, conv, nn.Identity(), pool)
    assert not winograd.covers(x, conv, nn.Identity(), pool)  # autograd on


def test_a_folded_network_scores_as_with_torchs_operators(monkeypatch):
    """The recipe's network, folded, at 224x224: the first block runs fused (`fused.inference_stem`),
    Winograd in every other, and the logits are those of torch's operators up to rounding."""
    torch.manual_seed(0)
    network = SmallCNN([16, 32, 64, 128])
    network.train()
    with torch.no_grad():
        network(torch.rand(8, 1, 224, 224))  # BatchNorm statistics that are not the identity
    folded = network.folded().to(memory_format=torch.channels_last)
    x = torch.rand(5, 1, 224, 224)
    calls = []
    for module, name in ((fused, "inference_stem"), (winograd, "conv_pool_relu")):
        run = getattr(module, name)
        monkeypatch.setattr(module, name, lambda x, conv, run=run: calls.append(conv) or run(x, conv))
    with torch.inference_mode():
        ours = folded(x)
        with kernels(False):
            torchs = folded(x)
    assert calls == [folded.features[i] for i in (0, 4, 8, 12)]
    assert (ours - torchs).abs().max() <= 1e-4 * torchs.abs().max()


def test_kernels_just_compiled_round_as_the_cached_ones(tmp_path):
    """numba compiles the kernels at the first run after installing and loads them from its cache later:
    both must give the same bits, or a model would score differently on its first run. A folded network
    runs every inference kernel: the fused first block (`pneumo.cpu.fused`) and Winograd's convolutions."""
    script = (
        "import hashlib, torch\n"
        "from pneumo.model.network import SmallCNN\n"
        "torch.manual_seed(0)\n"
        "network = SmallCNN([8, 16, 32])\n"
        "with torch.no_grad():\n"
        "    network(torch.rand(4, 1, 64, 64))\n"
        "folded = network.folded()\n"
        "x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))\n"
        "with torch.inference_mode():\n"
        "    print(hashlib.sha256(folded.logit(x).numpy().tobytes()).hexdigest())\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    fresh, cached = (
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True) for _ in "ab"
    )
    assert fresh.returncode == cached.returncode == 0, fresh.stderr + cached.stderr
    assert any((tmp_path / "numba").rglob("*.nbc"))  # the second run did load from the cache
    assert fresh.stdout == cached.stdout


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w",
    [(3, 16, 32, 56, 56), (2, 32, 64, 28, 28), (2, 64, 128, 14, 14), (2, 5, 7, 9, 13), (1, 3, 4, 2, 3)],
    ids=lambda v: str(v),
)
def test_the_training_convolution_and_its_gradients_are_torchs_up_to_rounding(monkeypatch, n, c_in, c_out, h, w):
    """Output, the input's gradient (by Winograd too) and the weight's, against torch in float64; chunks of
    one image."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(n, c_in, h, w, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(n, c_out, h, w, generator=gen)
    assert winograd.covers_conv(x, conv)
    y = winograd.conv3x3(x, conv)
    (y * grad).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64, padding=1)
    (y64 * grad.double()).sum().backward()
    assert y.shape == y64.shape and y.is_contiguous(memory_format=torch.channels_last)
    for ours, exact in ((y, y64), (x.grad, x64.grad), (conv.weight.grad, w64.grad)):
        assert (ours.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_the_training_convolution_computes_only_the_gradients_asked_for(monkeypatch):
    """The input's gradient is a second Winograd convolution, the weight's a call of torch's backward:
    neither runs for a tensor that needs no gradient."""
    calls = []
    full, backward = winograd._full, torch.ops.aten.convolution_backward
    monkeypatch.setattr(winograd, "_full", lambda *a: calls.append("winograd") or full(*a))
    monkeypatch.setattr(torch.ops.aten, "convolution_backward", lambda *a: calls.append("torch") or backward(*a))
    conv = nn.Conv2d(4, 8, 3, 1, 1, bias=False)
    x = torch.rand(2, 4, 8, 8)
    winograd.conv3x3(x, conv).sum().backward()  # an input that needs no gradient
    assert calls == ["winograd", "torch"] and x.grad is None and conv.weight.grad is not None
    calls.clear()
    weight_grad = conv.weight.grad.clone()
    conv.requires_grad_(False)
    x.requires_grad_()
    winograd.conv3x3(x, conv).sum().backward()
    assert calls == ["winograd", "winograd"] and x.grad is not None and torch.equal(conv.weight.grad, weight_grad)


def test_only_a_plain_convolution_on_the_cpu_runs_in_training(monkeypatch):
    conv, x = nn.Conv2d(4, 8, 3, 1, 1, bias=False), torch.rand(2, 4, 8, 8)
    assert winograd.covers_conv(x, conv)
    assert not winograd.covers_conv(x, nn.Conv2d(4, 8, 3, 1, 1))  # biased: a folded block's (conv_pool_relu)
    assert not winograd.covers_conv(x, nn.Conv2d(4, 8, 3, 2, 1, bias=False))
    assert not winograd.covers_conv(x, nn.Conv2d(4, 8, 5, 1, 2, bias=False))
    assert not winograd.covers_conv(x.double(), conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.covers_conv(x, conv)
    monkeypatch.setattr(winograd, "kernels", lambda: None)
    assert not winograd.covers_conv(x, conv)


def test_a_training_step_of_smallcnn_is_the_same_with_winograd_or_not(monkeypatch):
    """The recipe's network at 224x224: Winograd runs in blocks 2 to 4, and the loss's gradients are torch's
    convolutions' up to rounding."""
    torch.manual_seed(0)
    network = SmallCNN([16, 32, 64, 128], dropout=0.0).to(memory_format=torch.channels_last)
    x, target = torch.rand(4, 1, 224, 224), torch.tensor([0.0, 1.0, 1.0, 0.0])
    calls = []
    run = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, conv: calls.append(conv) or run(x, conv))

    def gradients():
        network.zero_grad()
        F.binary_cross_entropy_with_logits(network(x), target).backward()
        return {name: p.grad.clone() for name, p in network.named_parameters()}

    ours = gradients()
    with kernels(["fused"]):
        torchs = gradients()
    assert calls == [network.features[i] for i in (4, 8, 12)]
    for name, g in torchs.items():
        assert (ours[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


def test_the_weight_an_optimizer_step_left_is_the_one_used_next():
    """A fused AdamW step changes the weights without advancing their version counter: the training
    convolution must not keep a transformed weight from one step (or validation) to the next."""
    torch.manual_seed(0)
    network = SmallCNN([8, 16], dropout=0.0)
    optimizer = network.configure_optimizer(0.1, 0.0)
    conv = network.features[4]
    for _ in range(2):
        network(torch.rand(2, 1, 32, 32)).sum().backward()
        optimizer.step()
        x = torch.rand(2, 8, 8, 8)
        expected = F.conv2d(x, conv.weight.detach(), padding=1)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                assert (winograd.conv3x3(x, conv) - expected).abs().max() <= 1e-5 * expected.abs().max()
