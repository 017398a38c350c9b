import torch

from pneumo.core.config import AugmentConfig
from pneumo.data.augment import affine_grid, augment


def batch(n=4, size=32):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def test_zero_strength_is_identity():
    x = batch()
    off = AugmentConfig(rotate_deg=0, translate=0, scale=0, brightness=0, contrast=0)
    assert torch.allclose(augment(x, off, torch.Generator().manual_seed(1)), x, atol=1e-5)


def test_random_but_reproducible_per_generator():
    x, cfg = batch(), AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    c = augment(x, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    # Each image gets its own transform: the same image twice comes out two ways.
    twins = augment(torch.cat([x[:1], x[:1]]), cfg, torch.Generator().manual_seed(3))
    assert not torch.allclose(twins[0], twins[1])


def test_shift_moves_content():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 12:20, 12:20] = 1
    shift = AugmentConfig(rotate_deg=0, translate=0.2, scale=0, brightness=0, contrast=0)
    y = augment(x, shift, torch.Generator().manual_seed(0))
    assert abs(y.sum() - x.sum()) < 1  # moved, not erased
    assert not torch.allclose(y, x)


ONLY = {"rotate_deg": 0, "translate": 0, "scale": 0, "brightness": 0, "contrast": 0}


def square(size=64, lo=24, hi=40):
    x = torch.zeros(8, 1, size, size)
    x[..., lo:hi, lo:hi] = 1
    return x


def extent(image: torch.Tensor, dim: int) -> float:
    """Width (dim=-1) or height (dim=-2) of the bright region, in pixels."""
    return float((image > 0.5).any(dim=dim).sum())


def test_aspect_stretches_width_against_height():
    x = square()
    y = augment(x, AugmentConfig(aspect=0.5, **ONLY), torch.Generator().manual_seed(0))
    ratios = torch.tensor([extent(img[0], -2) / extent(img[0], -1) for img in y])
    # A 16x16 square becomes a rectangle up to 1.5^2 = 2.25 times wider than high, or the reverse,
    # keeping its area (within resampling error).
    assert ratios.max() > 1.3 and ratios.min() < 1 / 1.3 and ratios.max() < 2.4 and ratios.min() > 1 / 2.4
    assert torch.allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.15)


def test_hflip_mirrors_about_half_the_images():
    x = torch.zeros(200, 1, 16, 16)
    x[..., :, :4] = 1  # a bar on the left
    y = augment(x, AugmentConfig(hflip=0.5, **ONLY), torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.allclose(img, src.flip(-1), atol=1e-5) for img, src in zip(y, x, strict=True)])
    kept = torch.tensor([torch.allclose(img, src, atol=1e-5) for img, src in zip(y, x, strict=True)])
    assert bool((mirrored ^ kept).all())  # every image is exactly one of the two
    assert 70 < int(mirrored.sum()) < 130


def test_gamma_changes_exposure_but_keeps_black_and_white():
    x = torch.linspace(0, 1, 64).repeat(32, 1, 64, 1)
    y = augment(x, AugmentConfig(gamma=0.5, **ONLY), torch.Generator().manual_seed(0))
    means = y.mean((1, 2, 3))
    assert means.max() - means.min() > 0.1
    assert torch.allclose(y[..., 0], torch.zeros(()), atol=1e-3) and torch.allclose(
        y[..., -1], torch.ones(()), atol=1e-3
    )
    assert bool((y[..., 1:] >= y[..., :-1] - 1e-5).all())  # still monotone: order of grey levels kept


def test_erase_blanks_one_rectangle_to_the_image_mean():
    x = torch.rand(400, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = augment(x, AugmentConfig(erase=0.5, **ONLY), torch.Generator().manual_seed(0))
    erased = (y - x).abs() > 1e-4  # resampling at identity moves values by ~1e-7
    changed = erased.flatten(1).float().mean(1)
    hit = changed > 0
    assert 150 < int(hit.sum()) < 250
    # Erased area: 2% to 20% of the image (less where the border cuts it; plus pixel rounding at 32x32).
    assert changed[hit].max() <= 0.24 and changed[hit].median() > 0.03
    fill = [float(img[mask].median()) for img, mask in zip(y[hit][:10], erased[hit][:10], strict=True)]
    assert torch.allclose(torch.tensor(fill), x[hit][:10].mean((1, 2, 3)), atol=1e-6)


def test_new_kinds_at_zero_draw_nothing():
    # Recipes written before aspect/hflip/gamma/erase existed keep their exact augmentation stream:
    # six draws per image (angle, zoom, two shifts, contrast, brightness), as before.
    g = torch.Generator().manual_seed(4)
    augment(batch(), AugmentConfig(aspect=0, hflip=0, gamma=0, erase=0, sharpen=0, noise=0), g)
    reference = torch.Generator().manual_seed(4)
    for _ in range(6):
        torch.rand(4, generator=reference, dtype=torch.float64)
    assert torch.equal(g.get_state(), reference.get_state())


def test_blur_softens_edges_by_a_random_amount_per_image():
    x = torch.zeros(16, 1, 32, 32)
    x[..., 16:] = 1  # a vertical edge
    y = augment(x, AugmentConfig(blur=2.0, **ONLY), torch.Generator().manual_seed(0))
    width = ((y > 0.05) & (y < 0.95)).float().sum(-1).mean((1, 2))  # pixels in the ramp, per row
    assert width.min() < 2 and width.max() >= 4  # from nearly sharp to a ramp of several pixels
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-4)  # blur keeps brightness
    assert torch.allclose(y[..., :4], torch.zeros(()), atol=1e-4) and torch.allclose(
        y[..., -4:], torch.ones(()), atol=1e-4
    )


def test_sharpen_steepens_edges_by_a_random_amount_per_image():
    x = torch.full((16, 1, 32, 32), 0.3)
    x[..., 16:] = 0.7  # a vertical edge, mid-grey on both sides so that overshoot shows
    y = augment(x, AugmentConfig(sharpen=1.5, **ONLY), torch.Generator().manual_seed(0))
    overshoot = y[:, 0, :, 16].mean(-1) - 0.7  # the bright side of the edge rises above its level
    assert overshoot.min() < 0.02 and overshoot.max() > 0.08  # from barely to clearly sharpened
    assert torch.allclose(y[..., :4], torch.full((), 0.3), atol=1e-4)  # flat areas untouched


def test_noise_has_a_random_strength_per_image_and_keeps_the_mean():
    x = torch.full((64, 1, 32, 32), 0.5)
    y = augment(x, AugmentConfig(noise=0.04, **ONLY), torch.Generator().manual_seed(0))
    sd = (y - x).std(dim=(1, 2, 3))
    assert sd.min() < 0.01 and 0.03 < sd.max() < 0.045  # uniform in [0, 0.04]
    assert abs(float((y - x).mean())) < 1e-3
    again = augment(x, AugmentConfig(noise=0.04, **ONLY), torch.Generator().manual_seed(0))
    assert torch.equal(y, again)  # drawn from the run's generator: reproducible


def test_affine_grid_is_torchs_up_to_rounding():
    # The grid is built from a per-row and a per-column term instead of F.affine_grid's batched
    # product: the same sampling positions, with less rounding (theta stays float64 until the sum).
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for h, w in ((32, 32), (17, 40)):
        x = torch.zeros(5, 1, h, w)
        exact = torch.nn.functional.affine_grid(theta, [5, 1, h, w], align_corners=False)
        ours = affine_grid(theta, x)
        assert ours.shape == exact.shape and ours.dtype == torch.float32
        assert float((ours.double() - exact).abs().max()) < 1e-6
        assert float((affine_grid(theta, x.double()) - exact).abs().max()) < 1e-12
