import torch

from pneumo.config import AugmentConfig
from pneumo.data.augment import augment


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
