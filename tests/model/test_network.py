import pytest
import torch

from pneumo.core.config import ModelConfig
from pneumo.cpu import kernels
from pneumo.model.network import Classifier, MaxPool2x2, SmallCNN, build_model, equalize, normalize


def test_one_logit_per_image_at_any_size():
    model = build_model(ModelConfig(channels=[8, 16, 32], stem_stride=2)).eval()
    for size in (48, 64, 224):
        assert model(torch.rand(3, 1, size, size)).shape == (3,)


def test_architecture_follows_config():
    model = SmallCNN([4, 8], stem_stride=1, dropout=0.0)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert convs[0].stride == (1, 1)
    n_params = sum(p.numel() for p in model.parameters())
    # conv 1->4 (36) + BN (8) + conv 4->8 (288) + BN (16) + linear 8->1 (9)
    assert n_params == 36 + 8 + 288 + 16 + 9


def test_learns_a_trivial_task():
    torch.manual_seed(0)
    model = SmallCNN([8, 8], stem_stride=1, dropout=0.0)
    x = torch.rand(32, 1, 16, 16) * 0.5
    y = (torch.arange(32) % 2).float()
    x[y == 1, :, 4:12, 4:12] += 0.5  # positives carry a bright square
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_equalize_gives_each_pixel_its_mid_rank_among_the_grey_levels():
    x = torch.tensor([0, 0, 255, 255, 255, 255, 128, 64], dtype=torch.float32).view(1, 1, 2, 4) / 255
    # Levels 0 (2 pixels), 64 (1), 128 (1), 255 (4): darker pixels plus half of the level's own, of 8.
    expected = torch.tensor([1, 1, 6, 6, 6, 6, 3.5, 2.5]).view(1, 1, 2, 4) / 8
    assert torch.allclose(equalize(x), expected)
    assert torch.equal(equalize(torch.full((2, 1, 4, 4), 0.3)), torch.full((2, 1, 4, 4), 0.5))  # blank: grey


def test_equalize_removes_any_monotone_change_of_the_grey_levels():
    levels = torch.randint(0, 128, (3, 1, 16, 16), generator=torch.Generator().manual_seed(0)).float()
    x = levels / 255
    brighter_and_harder = (levels * 2 + 1) / 255  # another exposure: each level to another, order kept
    assert torch.allclose(equalize(brighter_and_harder), equalize(x))
    assert not torch.allclose(normalize(brighter_and_harder), normalize(x))


def test_standardize_removes_brightness_and_contrast():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = normalize(x, "standardize")
    # The network sees mean 0 and standard deviation 1 (up to the small floor that keeps blank images finite).
    assert torch.allclose(out.mean((-2, -1)), torch.zeros(2, 1), atol=1e-5)
    assert torch.allclose(out.std((-2, -1)), torch.ones(2, 1), atol=1e-2)
    assert torch.allclose(normalize(0.4 * x + 0.3, "standardize"), out, atol=1e-2)
    assert torch.equal(normalize(torch.zeros(1, 1, 8, 8), "standardize"), torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("per_image", ["standardize", "equalize"])
def test_the_per_image_step_is_the_models_own(per_image):
    """build_model, the network and the classifier all apply the configured step, before anything else."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=[4, 8], per_image=per_image)).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.logit(normalize(x, per_image)))
        assert torch.equal(Classifier([model])(x), model(x))
        assert torch.equal(Classifier([model.folded()])(x), model.folded()(x))


def test_classifier_averages_members_mirror_and_applies_the_calibration():
    torch.manual_seed(0)
    a, b = SmallCNN([4, 8], stem_stride=1).eval(), SmallCNN([4, 8], stem_stride=1).eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        mean = (a(x) + b(x)) / 2
        assert torch.allclose(Classifier([a, b], scale=2.0, bias=-1.0).eval()(x), 2 * mean - 1, atol=1e-6)
        flipped = (a(x.flip(-1)) + b(x.flip(-1))) / 2
        assert torch.allclose(Classifier([a, b], tta=True).eval()(x), (mean + flipped) / 2, atol=1e-6)
        assert torch.equal(Classifier([a]).eval()(x), a(x))  # one member, no calibration: the network itself


@kernels(False)
def test_pooling_before_the_relu_changes_nothing():
    """SmallCNN pools before its ReLU for speed; the classic order gives the same outputs and gradients.
    (The CPU kernels, equal only up to rounding, are off here: tests/cpu holds them.)"""
    torch.manual_seed(0)
    model = SmallCNN([4, 8], stem_stride=2, dropout=0.0)  # training mode: batch statistics, no randomness
    x = torch.rand(6, 1, 32, 32)
    out = model(x)
    out.sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    classic = model.head(model.features((x - 0.5) / 0.25)).squeeze(1)
    classic.sum().backward()
    assert torch.equal(out, classic)
    assert all(torch.equal(fast[n], p.grad) for n, p in model.named_parameters())


def test_flops_per_image():
    model = SmallCNN([32, 64, 128, 256], stem_stride=2)
    # Convolutions at 112, 56, 28 and 14 pixels: 3.6 + 57.8 * 3 million multiply-adds.
    macs = 112**2 * 32 * 9 + 56**2 * 64 * 32 * 9 + 28**2 * 128 * 64 * 9 + 14**2 * 256 * 128 * 9 + 256
    assert model.flops_per_image(224, training=False) == 2 * macs
    assert model.flops_per_image(224) == 6 * macs


def test_pooling_without_autograd_gives_max_pool2ds_values_exactly():
    pool = MaxPool2x2()
    for shape in ((2, 4, 8, 8), (2, 3, 7, 9)):  # odd sizes: the last row and column are dropped
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last)
        x[0, 0, 0, :2] = float("nan")  # propagated, as max_pool2d does
        with torch.no_grad():
            fast = pool(x)
        expected = torch.nn.functional.max_pool2d(x, 2)
        assert fast.shape == expected.shape and torch.equal(fast.isnan(), expected.isnan())
        assert torch.equal(fast.nan_to_num(), expected.nan_to_num())
        assert fast.is_contiguous(memory_format=torch.channels_last)
    # The whole network: scoring under inference_mode gives the logits of a forward with autograd.
    model = SmallCNN([8, 16], stem_stride=2).eval()
    x = torch.rand(3, 1, 30, 30)
    with torch.inference_mode():
        fast = model(x)
    assert torch.equal(fast, model(x).detach())
