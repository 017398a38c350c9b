import numpy as np
import pytest

from pneumo.data.synthetic import make_split
from pneumo.site import shift

IMAGES = make_split("val", 4, 64, 0.5, seed=0)[0]


def detail(images: np.ndarray) -> float:
    a = images.astype(float)
    return float(
        np.abs(4 * a[:, 1:-1, 1:-1] - a[:, :-2, 1:-1] - a[:, 2:, 1:-1] - a[:, 1:-1, :-2] - a[:, 1:-1, 2:]).mean()
    )


@pytest.mark.parametrize("name", [*shift.DESIGN, *shift.HELD_OUT])
def test_every_proxy_keeps_size_and_type_and_is_reproducible(name):
    rendering = {**shift.DESIGN, **shift.HELD_OUT}[name]
    out = shift.render(IMAGES, rendering, seed=1)
    assert out.shape == IMAGES.shape and out.dtype == np.uint8
    assert np.array_equal(out, shift.render(IMAGES, rendering, seed=1))
    assert not np.array_equal(out, IMAGES)


def test_held_out_proxies_were_not_used_for_design():
    assert not set(shift.DESIGN) & set(shift.HELD_OUT)


def test_proxies_do_what_they_say():
    assert detail(shift.render(IMAGES, shift.gaussian_noise(8))) > 1.5 * detail(IMAGES)
    assert detail(shift.render(IMAGES, shift.resolution(20))) < 0.7 * detail(IMAGES)
    wide = shift.render(IMAGES, shift.zoom(0.8))
    assert (wide[:, :4] == 0).all() and (wide[:, :, -4:] == 0).all()  # a black border around a wider field
    marked = shift.render(IMAGES, shift.marker)
    assert ((marked == 230).sum(axis=(1, 2)) > 20).all()  # a bright marker square in each image
