import numpy as np
import pytest
from PIL import Image

from conftest import FULLRES, KERMANY224, needs_shared
from pneumo.data.images import load_image, load_images
from pneumo.errors import PneumoError


def test_load_image_converts_and_squashes(tmp_path):
    rgb = np.zeros((40, 80, 3), dtype=np.uint8)
    rgb[:, :40] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    out = load_image(str(tmp_path / "wide.png"), 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    # Squashed, not cropped: the white left half is still the left half.
    assert out[:, :14].min() == 255 and out[:, 18:].max() == 0


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpeg"
    bad.write_text("this is not a JPEG")
    with pytest.raises(PneumoError, match="cannot read image .*broken.jpeg"):
        load_image(str(bad), 32)
    with pytest.raises(PneumoError, match="broken.jpeg"):
        load_images([str(bad)], 32, workers=2)


@needs_shared
def test_real_images_load_at_224():
    paths = sorted((KERMANY224 / "val" / "NORMAL").iterdir())[:4]
    batch = load_images([str(p) for p in paths], 224, workers=2)
    assert batch.shape == (4, 224, 224) and batch.dtype == np.uint8
    assert 40 < batch.mean() < 200 and batch.std() > 20  # a real radiograph, not a blank


@needs_shared
def test_full_resolution_files_resize_like_the_224_copies():
    files = sorted((FULLRES / "train" / "NORMAL").glob("*.jpeg"))[:5]
    for f in files:
        ours = load_image(str(f), 224).astype(float)
        reference = load_image(str(KERMANY224 / "train" / "NORMAL" / f.name), 224).astype(float)
        assert np.abs(ours - reference).mean() < 6, f.name
