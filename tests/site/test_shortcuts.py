import numpy as np
import pytest

from conftest import KERMANY224, needs_shared
from pneumo.site.shortcuts import ASPECT_GAP, blank_corners, blur, stretch_width, without_cues


def bar(width: int, size: int = 64) -> np.ndarray:
    image = np.zeros((1, size, size), np.uint8)
    image[:, 8:56, (size - width) // 2 : (size + width) // 2] = 255
    return image


def bright_width(images: np.ndarray) -> float:
    return float((images[0, 32] > 127).sum())


def detail(images: np.ndarray) -> float:
    """Mean absolute Laplacian: how much fine detail the images hold."""
    a = images.astype(float)
    return float(
        np.abs(4 * a[:, 1:-1, 1:-1] - a[:, :-2, 1:-1] - a[:, 2:, 1:-1] - a[:, 1:-1, :-2] - a[:, 1:-1, 2:]).mean()
    )


def test_stretch_width_scales_the_content_about_the_centre():
    assert bright_width(stretch_width(bar(20), 1.5)) == pytest.approx(30, abs=1)
    assert bright_width(stretch_width(bar(30), 1 / 1.5)) == pytest.approx(20, abs=1)
    assert (stretch_width(bar(20), 1.5)[0, :, 32] == bar(20)[0, :, 32]).all()  # heights unchanged


def test_blur_lowers_detail_and_keeps_brightness():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32)).astype(np.uint8)
    soft = blur(images, 0.5)

    assert detail(soft) < 0.6 * detail(images)  # white noise: a 0.5-pixel blur halves it
    assert soft.mean() == pytest.approx(images.mean(), abs=1)


def test_without_cues_swaps_the_shapes_of_the_classes():
    images = np.concatenate([bar(24), bar(24)])
    out = without_cues(images, np.array([0, 1]))
    assert set(out) == {"as is", "shapes swapped", "NORMAL detail lowered", "corners blanked"}
    normal, pneumonia = out["shapes swapped"][:1], out["shapes swapped"][1:]
    assert bright_width(normal) == pytest.approx(24 / ASPECT_GAP, abs=1)
    assert bright_width(pneumonia) == pytest.approx(24 * ASPECT_GAP, abs=1)
    assert (out["NORMAL detail lowered"][1] == images[1]).all()  # PNEUMONIA images untouched


def test_blank_corners_covers_the_four_corners_with_the_mean():
    images = np.arange(2 * 10 * 10, dtype=np.uint8).reshape(2, 10, 10)
    out = blank_corners(images)
    for i in range(2):
        mean = round(images[i].mean())
        for rows in (slice(0, 2), slice(8, 10)):
            for cols in (slice(0, 2), slice(8, 10)):
                assert (out[i, rows, cols] == mean).all()
    assert (out[:, 2:8] == images[:, 2:8]).all() and (out[:, :, 2:8] == images[:, :, 2:8]).all()


@needs_shared
def test_the_detail_gap_is_real_and_the_blur_closes_it():
    # The two constants in shortcuts.py, measured on 100 real training images of each class.
    from pneumo.data.images import load_image

    def load(label):
        files = sorted((KERMANY224 / "train" / label).glob("*.jpeg"))[::10][:100]
        return np.stack([load_image(str(f), 224) for f in files])

    normal, pneumonia = load("NORMAL"), load("PNEUMONIA")
    assert detail(normal) > 1.2 * detail(pneumonia)
    assert detail(blur(normal, 0.5)) == pytest.approx(detail(pneumonia), rel=0.1)
