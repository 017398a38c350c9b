"""The applicability check (pneumo.model.applicability): its statistics, their checks on load, and what
the shipped model flags."""

import glob

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import KERMANY224, ROOT, SHARED_DATA, needs_shared
from pneumo.core.errors import CheckpointError
from pneumo.data.synthetic import make_split
from pneumo.model.applicability import (
    BINS,
    MIN_P,
    TAIL,
    TEXTURE_BINS,
    TEXTURE_SIZE,
    THUMBNAIL,
    Applicability,
    Gaussian,
    describe,
    texture,
)
from pneumo.model.checkpoint import TrainedModel

MODEL = ROOT / "models" / "kermany.pt"


def blobs(n: int, shift: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Descriptors of a Gaussian population, moved by `shift` standard deviations."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {"features": 6, "thumbnail": THUMBNAIL**2, "histogram": BINS}
    return {name: torch.randn(n, d, generator=gen, dtype=torch.float64) + shift for name, d in sizes.items()}


def test_the_threshold_keeps_the_configured_share_of_validation_in_scope():
    check = Applicability.fit(blobs(2000), blobs(500, seed=1), quantile=0.9)
    assert np.mean((check.score(blobs(500, seed=1)) > check.threshold).numpy()) == pytest.approx(0.1, abs=0.01)
    fresh = (check.score(blobs(2000, seed=2)) > check.threshold).numpy().mean()
    assert 0.06 < fresh < 0.14  # new images of the same population: about the same share
    assert (check.score(blobs(200, shift=3.0, seed=3)) > check.threshold).all()


def test_an_adapted_check_flags_images_more_typical_of_the_population_it_left():
    """A model adapted from a home population to a site half a standard deviation away in every image
    descriptor: its own check, fitted on the site, passes many home images; with the home population
    as its origin it flags them, and what it flags of the site stays as it was."""
    moved = lambda d, by: {name: x + (by if name != "features" else 0.0) for name, x in d.items()}
    home = Applicability.fit(moved(blobs(2000, seed=4), 0.5), moved(blobs(500, seed=5), 0.5), 0.95)
    site = Applicability.fit(blobs(2000), blobs(500, seed=1), 0.95)
    adapted = site.leaving(home)
    assert set(adapted.origin) == {"thumbnail", "histogram"}  # the network's features are another network's
    at_home, at_site = moved(blobs(1000, seed=6), 0.5), blobs(1000, seed=7)
    share = lambda check, d: float((check.score(d) > check.threshold).double().mean())
    assert share(site, at_home) < 0.5 and share(adapted, at_home) > 0.95
    assert share(adapted, at_site) == pytest.approx(share(site, at_site), abs=0.01)
    # Kept in the checkpoint, and checked on load like the rest.
    loaded = Applicability.from_dict(adapted.to_dict(), 6, "site.pt")
    assert torch.allclose(loaded.score(at_home), adapted.score(at_home), rtol=1e-4)
    raw = adapted.to_dict()
    raw["origin"]["thumbnail"] = raw["origin"]["histogram"]
    with pytest.raises(CheckpointError, match="site.pt: applicability statistics 'thumbnail' do not fit"):
        Applicability.from_dict(raw, 6, "site.pt")


def test_a_p_value_is_the_share_of_validation_at_least_as_far():
    eye, reference = torch.eye(2, dtype=torch.float64), torch.arange(1.0, 10.0).double()
    g = Gaussian(torch.zeros(2, dtype=torch.float64), eye, reference)
    # Squared distances 0, 4.5 and 9 against the nine reference distances 1..9: 9, 5 and 1 of them at
    # least as far, the image itself counted once more (a conformal p-value, never 0).
    p = g.p_value(torch.tensor([[0.0, 0.0], [1.5, 1.5], [3.0, 0.0]]))
    assert p.tolist() == pytest.approx([10 / 10, 6 / 10, 2 / 10])


def test_beyond_the_farthest_validation_image_the_p_value_falls_along_an_exponential_tail():
    eye, reference = torch.eye(2, dtype=torch.float64), torch.arange(1.0, 10.0).double()
    g = Gaussian(torch.zeros(2, dtype=torch.float64), eye, reference)
    # The farthest six distances, 4..9, lie 1..5 beyond the sixth farthest: a tail of scale 3 past 9.
    p = g.p_value(torch.tensor([[12**0.5, 0.0], [10.0, 0.0]]))
    assert p.tolist() == pytest.approx([1 / 10 * np.exp(-1), MIN_P])
    # Too few validation images to fit a tail to: the share stays at its floor.
    few = Gaussian(torch.zeros(2, dtype=torch.float64), eye, reference[-TAIL:])
    assert few.p_value(torch.tensor([[10.0, 0.0]])).tolist() == pytest.approx([1 / (TAIL + 1)])


def test_descriptors_are_a_thumbnail_a_histogram_and_the_normalized_features():
    x = torch.rand(3, 1, 32, 32)
    features = [torch.rand(3, 4) * 5, torch.rand(3, 2)]
    d = describe(x, features)
    assert torch.allclose(d["histogram"].sum(1), torch.ones(3))
    assert torch.allclose(d["thumbnail"], torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))
    assert torch.allclose(d["features"][:, :4].norm(dim=1), torch.ones(3))
    expected = torch.histc(x[0], BINS, 0, 1) / x[0].numel()
    assert torch.allclose(d["histogram"][0], expected)
    assert d["texture"].shape == (3, TEXTURE_SIZE) and torch.equal(d["texture"], texture(x))


def test_texture_is_the_share_of_each_scales_band_pass_magnitudes_in_each_bin():
    """Stripes 2 pixels wide: averaged over 2x2 blocks they alternate 0 and 1 (|Laplacian| 2, the last
    bin); over 4x4 and 8x8 blocks they are a flat 0.5 (|Laplacian| 0, the first bin). A flat image
    has every scale in the first bin, whatever its grey level."""
    stripes = (torch.arange(64) // 2 % 2).float().expand(64, 64).reshape(1, 1, 64, 64)
    first, last = torch.zeros(TEXTURE_BINS), torch.zeros(TEXTURE_BINS)
    first[0], last[-1] = 1, 1
    assert torch.equal(texture(stripes)[0], torch.cat([last, first, first]))
    assert torch.equal(texture(torch.full((2, 1, 64, 64), 0.7))[1], torch.cat([first, first, first]))
    assert texture(torch.rand(1, 1, 16, 16)).shape == (1, TEXTURE_SIZE)  # the smallest image a config allows
    # Other scales (scripts/ood_study.py studies them): unaveraged, every pixel's |Laplacian| is 1,
    # the top of bin 14.
    at_one = torch.zeros(TEXTURE_BINS)
    at_one[14] = 1
    assert torch.equal(texture(stripes, (1, 8))[0], torch.cat([at_one, first]))


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw["gaussians"]["features"].pop("precision"),
        lambda raw: raw["gaussians"]["thumbnail"].__setitem__("mean", torch.zeros(3)),
        lambda raw: raw["gaussians"]["histogram"]["mean"].__setitem__(0, float("nan")),
        lambda raw: raw["gaussians"]["histogram"].__setitem__("reference", torch.tensor([3.0, 1.0])),
        lambda raw: raw["gaussians"]["histogram"].__setitem__("mean", "0.5"),
        lambda raw: raw.__setitem__("threshold", float("inf")),
        lambda raw: raw.__setitem__("quantile", 1.5),
        lambda raw: raw.__setitem__("threshold", torch.zeros(3)),
        # Tables that are not dicts: a tensor or a list indexed by a name (found by tests/test_fuzz.py)
        lambda raw: torch.zeros(1).expand(10, 10),
        lambda raw: raw.__setitem__("gaussians", [1, 2]),
        lambda raw: raw["gaussians"].__setitem__("thumbnail", torch.zeros(4, 4)),
    ],
)
def test_damaged_statistics_are_refused_on_load(damage):
    raw = Applicability.fit(blobs(200), blobs(50, seed=1), 0.9).to_dict()
    Applicability.from_dict(raw, 6, "x.pt")  # intact: accepted
    replaced = damage(raw)  # a change in place, or statistics in place of the whole
    raw = raw if replaced is None else replaced
    with pytest.raises(CheckpointError, match="x.pt"):
        Applicability.from_dict(raw, 6, "x.pt")


def test_statistics_from_before_the_texture_descriptor_still_load_and_score():
    """A checkpoint written before texture was a descriptor: its three descriptors are scored."""
    train, val = blobs(300), blobs(60, seed=1)
    raw = Applicability.fit(train, val, 0.9).to_dict()
    assert "texture" not in raw["gaussians"]
    old = Applicability.from_dict(raw, 6, "old.pt")
    with_texture = {**blobs(5, shift=0.1, seed=2), "texture": torch.rand(5, TEXTURE_SIZE)}
    assert torch.allclose(old.score(with_texture), Applicability.fit(train, val, 0.9).score(with_texture))


def test_statistics_of_another_network_are_refused():
    raw = Applicability.fit(blobs(200), blobs(50, seed=1), 0.9).to_dict()
    with pytest.raises(CheckpointError, match="do not fit this network"):
        Applicability.from_dict(raw, 7, "x.pt")


def test_a_trained_model_carries_its_check(trained_checkpoint):
    model = TrainedModel.load(trained_checkpoint)
    assert model.applicability is not None and model.applicability.quantile == model.config.train.ood_quantile
    images, _ = make_split("test", 48, 32, 0.5, seed=0)
    assert model.out_of_scope(images).mean() <= 0.1  # the training population: in scope
    noise = np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8)
    assert model.out_of_scope(noise).all()


def not_chest_xrays(xrays: np.ndarray) -> dict[str, np.ndarray]:
    """224x224 images a careless user might feed a chest X-ray model, built here: noise, blank frames,
    text, photograph-like scenes, and chest X-rays turned on their side, upside down or inverted."""
    rng = np.random.default_rng(0)
    text, photos = [], []
    for i in range(6):
        page = Image.new("L", (224, 224), 255 if i % 2 else 0)
        draw = ImageDraw.Draw(page)
        for row in range(12):
            draw.text((5, 5 + 18 * row), f"Report {i}.{row}: no acute findings", fill=0 if i % 2 else 255)
        text.append(np.asarray(page))
        y, x = np.mgrid[0:224, 0:224] / 224
        scene = Image.fromarray(np.clip(120 + 80 * np.sin(6 * x + i) * np.cos(4 * y - i), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(scene)
        for _ in range(6):
            a, b = sorted(rng.integers(0, 224, 2)), sorted(rng.integers(0, 224, 2))
            draw.ellipse([a[0], b[0], a[1], b[1]], fill=int(rng.integers(0, 256)))
        photos.append(np.asarray(scene))
    return {
        "noise": rng.integers(0, 256, (6, 224, 224), dtype=np.uint8),
        "blank": np.stack([np.full((224, 224), v, np.uint8) for v in (0, 60, 128, 200, 255, 30)]),
        "text": np.stack(text),
        "photographs": np.stack(photos),
        "on their side": np.rot90(xrays[:6], axes=(1, 2)).copy(),
        "upside down": xrays[6:12, ::-1].copy(),
        "inverted": 255 - xrays[12:18],
    }


@needs_shared
def test_the_shipped_model_flags_what_is_not_a_pediatric_chest_xray():
    model = TrainedModel.load(MODEL)
    val = sorted(glob.glob(str(KERMANY224 / "val" / "*" / "*.jpeg")))
    official = np.stack([np.asarray(Image.open(f).convert("L")) for f in val])
    assert model.out_of_scope(official).sum() <= 1  # another grading batch of the same hospital
    train = sorted(glob.glob(str(KERMANY224 / "train" / "*" / "*.jpeg")))[::250]
    xrays = np.stack([np.asarray(Image.open(f).convert("L")) for f in train])
    odd = not_chest_xrays(xrays)
    upside_down = odd.pop("upside down")
    for name, images in odd.items():
        assert model.out_of_scope(images).all(), name
    assert model.out_of_scope(upside_down).sum() >= 3  # the one kind it misses at times (the card says so)
    nih = sorted(glob.glob(str(SHARED_DATA / "nih_cxr14_sample" / "*" / "*.png")))[::4]
    adults = np.stack([np.asarray(Image.open(f).convert("L").resize((224, 224), Image.BILINEAR)) for f in nih])
    assert model.out_of_scope(adults).mean() >= 0.9  # the docs' figure (98% of all 512) as a floor
