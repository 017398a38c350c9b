import io
import os
import time
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from conftest import FULLRES, KERMANY224, needs_shared
from pneumo.core.errors import BadImageError
from pneumo.data.images import DRAFT_MARGIN, _draft, decode_all, load_image, to_grayscale


def save(path, image: Image.Image, **kw):
    image.save(path, **kw)
    return str(path)


def test_squashed_not_cropped(tmp_path):
    rgb = np.zeros((40, 80, 3), dtype=np.uint8)
    rgb[:, :40] = (255, 255, 255)
    out = load_image(save(tmp_path / "wide.png", Image.fromarray(rgb)), 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out[:, :14].min() == 255 and out[:, 18:].max() == 0


def test_modes_are_converted_not_rejected(tmp_path):
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))  # dark left, bright right
    cases = {
        "l.png": Image.fromarray((ramp * 255).astype(np.uint8)),
        "i16.png": Image.fromarray((ramp * 65535).astype(np.uint16)),  # full 16-bit range
        "i12.png": Image.fromarray((ramp * 4095).astype(np.uint16)),  # 12 significant bits, as many scanners write
        "rgb.png": Image.fromarray((np.stack([ramp] * 3, -1) * 255).astype(np.uint8)),
        "rgba.png": Image.fromarray(
            np.dstack([(np.stack([ramp] * 3, -1) * 255).astype(np.uint8), np.full((64, 64), 255, np.uint8)])
        ),
        "la.png": Image.fromarray((ramp * 255).astype(np.uint8)).convert("LA"),
        "p.png": Image.fromarray((ramp * 255).astype(np.uint8)).convert("P"),
        "cmyk.jpg": Image.fromarray((np.stack([ramp] * 3, -1) * 255).astype(np.uint8)).convert("CMYK"),
        "f.tif": Image.fromarray((ramp * 1000 - 300).astype(np.float32)),
    }
    for name, image in cases.items():
        out = load_image(save(tmp_path / name, image), 64).astype(float)
        # The same picture whatever the encoding: black on the left, white on the right.
        assert out[:, :4].mean() < 12 and out[:, -4:].mean() > 243, (
            name,
            image.mode,
            out[:, :4].mean(),
            out[:, -4:].mean(),
        )


def test_transparent_pixels_become_black(tmp_path):
    rgba = np.full((16, 16, 4), 255, np.uint8)
    rgba[:, :8, 3] = 0
    out = load_image(save(tmp_path / "alpha.png", Image.fromarray(rgba)), 16)
    assert out[:, :8].max() == 0 and out[:, 8:].min() == 255


def test_exif_orientation_is_honoured(tmp_path):
    img = np.zeros((20, 40), np.uint8)
    img[:, :10] = 255  # bright band on the left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(save(tmp_path / "rotated.jpg", Image.fromarray(img), exif=exif, quality=95), 40)
    # Displayed upright, the bright band runs along the top.
    assert out[:5].mean() > 200 and out[-10:].mean() < 50


def test_damaged_exif_is_logged_with_the_file_name(tmp_path, caplog):
    img = np.zeros((20, 40), np.uint8)
    img[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "x" * 100  # the camera maker's tag, whose data the cut below loses
    damaged = exif.tobytes()[:-60]
    path = save(tmp_path / "damaged.jpg", Image.fromarray(img), exif=damaged, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning, which names no file, must not escape
        out = load_image(path, 40)
    assert out[:5].mean() > 200 and out[-10:].mean() < 50  # the orientation survived the damage
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: damaged metadata (Tag data larger than file. Skipping tag 271)"
    ]


def bad_files(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(good, format="JPEG")
    files = {
        "truncated.jpeg": good.getvalue()[: len(good.getvalue()) // 2],
        "empty.jpeg": b"",
        "text.jpeg": b"patient notes, not an image\n",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    save(tmp_path / "huge.png", Image.new("L", (300, 300)))  # over the limit the test sets below
    os.symlink(tmp_path / "gone.jpeg", tmp_path / "vanished.jpeg")
    return sorted(str(tmp_path / n) for n in [*files, "huge.png", "vanished.jpeg"])


def test_every_bad_file_is_named_with_a_reason(tmp_path):
    expected = {
        "truncated.jpeg": "truncated",
        "empty.jpeg": "empty file",
        "text.jpeg": "cannot identify image",
        "corrupt.png": "",
        "huge.png": "decompression bomb",
        "vanished.jpeg": "file not found",
    }
    for path in bad_files(tmp_path):
        with pytest.raises(BadImageError) as err:
            load_image(path, 32, max_pixels=50_000)
        assert path in str(err.value)
        assert expected[os.path.basename(path)] in err.value.reason.lower(), (path, err.value.reason)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path):
    path = save(tmp_path / "locked.png", Image.new("L", (8, 8)))
    os.chmod(path, 0)
    with pytest.raises(BadImageError, match="permission denied"):
        load_image(path, 8)


def test_decode_all_skips_or_stops(tmp_path):
    good = save(tmp_path / "good.png", Image.new("L", (10, 10), 200))
    paths = [good, *bad_files(tmp_path), good]
    images, bad = decode_all(paths, 8, 50_000, skip_bad=True, workers=2)
    assert sorted(bad) == list(range(1, len(paths) - 1))
    assert images[0].min() == 200 and images[-1].min() == 200
    with pytest.raises(BadImageError, match="cannot use image"):
        decode_all(paths, 8, 50_000, skip_bad=False, workers=2)


@needs_shared
def test_real_images_load_at_224():
    paths = sorted(str(p) for p in (KERMANY224 / "val" / "NORMAL").iterdir())[:4]
    batch, bad = decode_all(paths, 224, 100_000_000, skip_bad=False, workers=2)
    assert batch.shape == (4, 224, 224) and not bad
    assert 40 < batch.mean() < 200 and batch.std() > 20


@needs_shared
def test_full_resolution_files_resize_like_the_224_copies(monkeypatch):
    """All 100 original-resolution files (400 to 2900 px, grayscale and RGB) against the 224 copies,
    decoded with JPEG DCT-domain downscaling (the default) and in full."""
    files = sorted((FULLRES / "train").glob("*/*.jpeg"))
    references = [
        np.asarray(Image.open(KERMANY224 / "train" / f.parent.name / f.name).convert("L"), dtype=float) for f in files
    ]
    reduced = [load_image(str(f), 224) for f in files]
    monkeypatch.setattr("pneumo.data.images._draft", lambda im, size: None)  # the full decode, colour as colour
    full = [load_image(str(f), 224) for f in files]
    assert len(files) == 100 and any(not np.array_equal(a, b) for a, b in zip(reduced, full, strict=True))
    for images in (reduced, full):
        diffs = [np.abs(ours.astype(float) - ref).mean() for ours, ref in zip(images, references, strict=True)]
        # Bilinear matches the copies best of Pillow's filters; what remains is mostly the JPEG
        # re-encoding of the copies. The bound holds for both ways of decoding.
        assert np.mean(diffs) < 1.7 and max(diffs) < 2.5, (np.mean(diffs), max(diffs))


def test_data_max_pixels_governs_not_pillows_own_limit(tmp_path):
    # 9500 x 9500 = 90 million pixels: above Pillow's default warning limit, below data.max_pixels.
    path = save(tmp_path / "large.png", Image.new("L", (9500, 9500), 100))
    assert load_image(path, 16, max_pixels=200_000_000).shape == (16, 16)
    with pytest.raises(BadImageError, match="more than data.max_pixels"):
        load_image(path, 16, max_pixels=50_000_000)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(BadImageError, match="not a regular file"):
        load_image(str(tmp_path / "pipe.png"), 16)


def test_colour_jpegs_decode_straight_to_luma_like_a_grey_conversion(tmp_path, monkeypatch):
    # The decoder's luma channel is what convert("L") computes from the decoded RGB, up to rounding:
    # for files below and above the size at which the DCT-domain reduction starts. The reference
    # decodes colour as colour, reduced in the DCT domain as far (so that only the luma differs).
    rng = np.random.default_rng(0)
    for side in (300, 900):
        rgb = rng.integers(0, 256, (side // 30, side // 30, 3), dtype=np.uint8)
        path = save(tmp_path / f"colour{side}.jpg", Image.fromarray(rgb).resize((side, side)), quality=90)
        with Image.open(path) as im:
            _draft(im, 224)
            assert im.mode == "L"  # the decoder itself is asked for luma, before a pixel is decoded
            reduced_to = im.size
        assert reduced_to == ((side, side) if side < DRAFT_MARGIN * 224 else (side // 2, side // 2))
        ours = load_image(path, 224).astype(float)
        with monkeypatch.context() as m:
            m.setattr("pneumo.data.images._draft", lambda im, size, to=reduced_to: im.draft(None, to))
            grey = load_image(path, 224).astype(float)
        assert np.abs(ours - grey).mean() < 0.5 and np.abs(ours - grey).max() <= 2, side


def test_float_images_map_their_own_range_a_block_of_rows_at_a_time():
    """The same bytes as the whole-image formula, NaN and infinities included, across block edges."""
    a = np.random.default_rng(0).normal(size=(600, 70)).astype(np.float32) * 1000
    a[5, 5], a[300, 1] = np.nan, -np.inf
    for image in (a, np.where(np.isinf(a), 0, a)):
        whole = np.nan_to_num(image.astype(np.float64))
        expected = ((whole - whole.min()) / (whole.max() - whole.min()) * 255 + 0.5).astype(np.uint8)
        assert np.array_equal(np.asarray(to_grayscale(Image.fromarray(image))), expected)
    assert not np.asarray(to_grayscale(Image.fromarray(np.full((3, 3), np.nan, np.float32)))).any()


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_a_large_16_bit_or_float_image_becomes_8_bit_in_bounded_memory(mode):
    """A 36-megapixel 16-bit or float image: NumPy arrays of the 8-bit result and a few blocks of rows
    while it becomes 8-bit (under 2.5 bytes per pixel in all), where whole-image float64 steps took over
    20. (NumPy reports its arrays to tracemalloc; the image's own buffer is Pillow's.)"""
    import tracemalloc

    image = Image.new(mode, (6000, 6000))
    image.putpixel((10, 10), 1000)  # a range to map, for the float image
    tracemalloc.start()
    try:
        assert to_grayscale(image).getextrema() == ((0, 255) if mode == "F" else (0, 62))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * 36e6


def test_threads_decode_at_most_a_budget_of_pixels_at_once(tmp_path, monkeypatch):
    """Four threads, images of 10,000 pixels, a budget of 25,000: never more than two at once; an image
    larger than the whole budget still decodes, alone."""
    from pneumo.data import images

    class Watched(images.PixelBudget):
        seen: list[int] = []

        @contextmanager
        def share(self, pixels):
            with super().share(pixels):
                Watched.seen.append(self.used)
                time.sleep(0.01)  # long enough for the other threads to ask for their share
                yield

    monkeypatch.setattr(images, "DECODING", Watched(25_000))
    paths = [save(tmp_path / f"{i}.png", Image.new("L", (100, 100), i)) for i in range(12)]
    paths.append(save(tmp_path / "large.png", Image.new("L", (300, 300), 99)))
    out, bad = decode_all([str(p) for p in paths], 32, 100_000_000, skip_bad=False, workers=4)
    assert not bad and out[:12, 0, 0].tolist() == list(range(12)) and out[12, 0, 0] == 99
    assert 90_000 in Watched.seen  # the large image, alone
    assert max(n for n in Watched.seen if n != 90_000) == 20_000  # the others two at a time, not four
    assert images.DECODING.used == 0
