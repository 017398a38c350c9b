"""CSV manifests, MedMNIST npz files, DICOM, format detection, the preprocessing cache."""

import os
import shutil
import sys

import numpy as np
import pytest

from conftest import SHARED_DATA, needs_shared, tiny_raw
from pneumo.core.config import from_dict
from pneumo.core.errors import BadImageError, PneumoError
from pneumo.data import load_split, resolve_format
from pneumo.data.cache import cache_key, cached_decode
from pneumo.data.images import load_image
from pneumo.data.manifest import column, read_manifest
from pneumo.data.npz import read_npz_split
from pneumo.data.synthetic import write_folder

NPZ = SHARED_DATA / "pneumoniamnist28_trainval.npz"


def cfg_for(tmp_path, **data):
    return from_dict(tiny_raw(tmp_path / "run", data=data))


def write_csv(path, text):
    path.write_text(text)
    return path


# --- CSV manifests


def test_manifest_with_splits_and_patients(tmp_path):
    write_folder(tmp_path / "img", {"train": 8}, size=32)
    files = sorted((tmp_path / "img").rglob("*.png"))
    lines = ["path,label,patient_id,split"]
    for i, f in enumerate(files):
        label = "PNEUMONIA" if f.parent.name == "PNEUMONIA" else "0"
        lines.append(f"{f.relative_to(tmp_path)},{label},p{i // 2},{'test' if i < 2 else 'train'}")
    csv = write_csv(tmp_path / "list.csv", "\n".join(lines) + "\n")
    rows = read_manifest(csv)
    assert [r.split for r in rows].count("test") == 2
    assert rows[0].path == str(files[0].resolve()) and rows[0].patient == "p0"
    test = load_split(cfg_for(tmp_path, format="auto", root=str(csv)), "test")
    assert len(test) == 2 and test.ids == [str(files[0].resolve()), str(files[1].resolve())]


@pytest.mark.parametrize(
    "text, message",
    [
        ("file,label\na.png,0\n", "needs a header with the columns path and label"),
        ("path,label\na.png,maybe\n", "line 2: unknown label 'maybe'"),
        ("path,label\na.png,1\nb.png,0\n./a.png,1\n", "line 4: ./a.png is listed twice (first on line 2)"),
        ("path,label,split\na.png,1,holdout\n", "line 2: unknown split 'holdout'"),
        ("path,label\n", "lists no images"),
        ("path,label\n" + "a" * 140_000 + ".png,1\n", "not a readable CSV (field larger than field limit"),
        ("path,label\nloop.png,1\n", "line 2: .*loop.png cannot be resolved"),
    ],
)
def test_manifest_errors(tmp_path, text, message):
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    with pytest.raises(PneumoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(write_csv(tmp_path / "m.csv", text))


def test_a_manifest_column_pneumo_does_not_read_is_there_for_reports(tmp_path):
    csv = write_csv(tmp_path / "m.csv", "path,label,view\na.png,0,AP\nsub/b.png,1, PA \nc.png,1,\n")
    paths = [str((tmp_path / name).resolve()) for name in ("sub/b.png", "a.png", "c.png", "other.png")]
    assert column(csv, "view", paths) == ["PA", "AP", "", ""]
    assert column(csv, "age", paths) == ["", "", "", ""]
    assert column(tmp_path, "view", paths) == ["", "", "", ""]  # a folder sample has no columns


def test_manifest_labels_are_case_insensitive_and_default_split_is_train(tmp_path):
    rows = read_manifest(
        write_csv(tmp_path / "m.csv", "path,label\nperson7_virus_1.png,pneumonia\nIM-0001-0001.png,Normal\n")
    )
    assert [(r.label, r.split, r.patient) for r in rows] == [(1, "train", "person7"), (0, "train", "IM-0001")]


# --- MedMNIST npz


@needs_shared
def test_pneumoniamnist_npz_resized_and_missing_test_split(tmp_path):
    images, labels = read_npz_split(NPZ, "val", 64)
    assert images.shape == (524, 64, 64) and images.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    with pytest.raises(PneumoError, match="split 'test' not found in .* \\(it holds: train, val\\)"):
        read_npz_split(NPZ, "test", 28)
    cfg = cfg_for(tmp_path, format="auto", root=str(NPZ), val_source="official", image_size=32)
    assert resolve_format(cfg.data) == "npz"
    train = load_split(cfg, "train")
    assert len(train) == 3882 and train.images.shape[1:] == (32, 32)


def test_npz_of_other_shapes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", train_images=rgb, train_labels=np.array([[0], [1]] * 3))
    images, labels = read_npz_split(tmp_path / "x.npz", "train", 28)
    assert images.shape == (6, 28, 28) and labels.tolist() == [0, 1] * 3
    np.savez(tmp_path / "bad.npz", train_images=rgb[..., 0], train_labels=np.arange(6))
    with pytest.raises(PneumoError, match="must be 0 \\(normal\\) or 1"):
        read_npz_split(tmp_path / "bad.npz", "train", 28)


# --- DICOM


def write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None, bits=12):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == pixels.shape
    return str(path)


RAMP = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)  # 12-bit, dark left to bright right


def test_dicom_12_bit_mapped_to_8_bit(tmp_path):
    out = load_image(write_dicom(tmp_path / "a.dcm", RAMP), 64).astype(float)
    assert out[:, 0].mean() < 3 and out[:, -1].mean() > 252
    assert np.all(np.diff(out[0]) >= 0)  # monotonic ramp preserved


def test_dicom_monochrome1_is_inverted(tmp_path):
    out = load_image(write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1"), 64).astype(float)
    assert out[:, 0].mean() > 252 and out[:, -1].mean() < 3


def test_dicom_rescale_and_window(tmp_path):
    # Stored values 0..4095, rescaled to -1024..3071 ("HU"); a window of centre 0, width 400 shows
    # only -200..200: everything left of it black, right of it white, a ramp in between.
    path = write_dicom(tmp_path / "w.dcm", RAMP, slope=1.0, intercept=-1024.0, window=(0, 400))
    out = load_image(path, 64)
    hu = RAMP[0].astype(float) - 1024
    assert out[0][hu < -210].max() == 0 and out[0][hu > 210].min() == 255
    inside = out[0][(hu > -150) & (hu < 150)]
    assert 0 < inside.min() < inside.max() < 255


def test_broken_dicom_is_a_bad_image(tmp_path):
    pytest.importorskip("pydicom")
    (tmp_path / "x.dcm").write_bytes(b"DICM but not really")
    with pytest.raises(BadImageError, match="x.dcm: unreadable DICOM"):
        load_image(str(tmp_path / "x.dcm"), 32)


def test_without_pydicom_a_dicom_file_is_a_bad_image_not_a_failed_job(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    (tmp_path / "x.dcm").write_bytes(b"DICM")
    with pytest.raises(BadImageError, match="x.dcm: a DICOM file: reading DICOM needs pydicom"):
        load_image(str(tmp_path / "x.dcm"), 32)


def test_dicom_files_in_a_folder(tmp_path):
    for cls, offset in (("NORMAL", 0), ("PNEUMONIA", 1)):
        (tmp_path / "d" / "train" / cls).mkdir(parents=True)
        for i in range(4):
            write_dicom(tmp_path / "d" / "train" / cls / f"IM-{offset}{i:03d}-0001.dcm", RAMP // (i + 1))
    split = load_split(
        cfg_for(tmp_path, format="folder", root=str(tmp_path / "d"), val_source="carve", val_fraction=0.25), "train"
    )
    assert len(split) == 6 and split.images.shape[1:] == (32, 32)


# --- format detection, skipping bad files, the cache


def test_auto_format(tmp_path):
    write_folder(tmp_path / "f", {"train": 4}, size=32)
    assert resolve_format(cfg_for(tmp_path, format="auto", root=str(tmp_path / "f")).data) == "folder"
    with pytest.raises(PneumoError, match="neither a folder nor a .csv or .npz"):
        resolve_format(cfg_for(tmp_path, format="auto", root=str(tmp_path / "nothing.txt")).data)


def test_bad_files_skipped_and_reported(tmp_path):
    write_folder(tmp_path / "f", {"test": 10}, size=32)
    (tmp_path / "f" / "test" / "NORMAL" / "IM-9999-0001.jpeg").write_text("not an image")
    (tmp_path / "f" / "test" / "PNEUMONIA" / "person9_virus_9.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="IM-9999-0001.jpeg"):
        load_split(cfg_for(tmp_path, format="folder", root=str(tmp_path / "f")), "test")
    split = load_split(cfg_for(tmp_path, format="folder", root=str(tmp_path / "f"), on_bad_image="skip"), "test")
    assert len(split) == 10
    assert [(os.path.basename(p), r) for p, r in split.skipped] == [
        (
            "IM-9999-0001.jpeg",
            "cannot identify image file",
        ),
        ("person9_virus_9.png", "empty file (0 bytes)"),
    ]


def test_cache_is_reused_and_rebuilt_when_files_change(tmp_path):
    write_folder(tmp_path / "f", {"test": 6}, size=32)
    paths = sorted(str(p) for p in (tmp_path / "f").rglob("*.png"))
    cache = tmp_path / "cache"
    images, _ = cached_decode(paths, 16, 10**8, False, cache)
    assert isinstance(images, np.memmap) and images.shape == (6, 16, 16)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    # Reused: the same entry, even when the source files are gone.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "f", moved)
    key = cache_key(paths, 16, 10**8)
    assert key == entries[0].name
    # A changed file (new mtime), an added file, another size: three new keys.
    os.utime(paths[0], ns=(0, 0))
    assert cache_key(paths, 16, 10**8) != key
    assert (
        cache_key(paths + [str(moved / "test" / "NORMAL" / os.listdir(moved / "test" / "NORMAL")[0])], 16, 10**8) != key
    )
    assert cache_key(paths, 32, 10**8) != key
    again, _ = cached_decode(paths, 16, 10**8, False, cache)
    assert np.array_equal(again, images) and len(list(cache.iterdir())) == 2


def test_a_build_killed_half_way_leaves_nothing_used(tmp_path, monkeypatch):
    write_folder(tmp_path / "f", {"test": 4}, size=32)
    paths = sorted(str(p) for p in (tmp_path / "f").rglob("*.png"))
    cache = tmp_path / "cache"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pneumo.data.cache.os.rename", killed)  # everything written, not yet in place
    with pytest.raises(KeyboardInterrupt):
        cached_decode(paths, 16, 10**8, False, cache)
    monkeypatch.undo()
    assert list(cache.iterdir()) == []  # neither an entry nor a temp folder
    images, _ = cached_decode(paths, 16, 10**8, False, cache)
    assert images.shape == (4, 16, 16)


def test_cached_bad_files_still_follow_the_policy(tmp_path):
    write_folder(tmp_path / "f", {"test": 4}, size=32)
    bad = tmp_path / "f" / "test" / "NORMAL" / "IM-0000-0009.png"
    bad.write_bytes(b"")
    paths = sorted(str(p) for p in (tmp_path / "f").rglob("*.png"))
    _, skipped = cached_decode(paths, 16, 10**8, True, tmp_path / "cache")
    assert list(skipped.values()) == ["empty file (0 bytes)"]
    with pytest.raises(BadImageError, match="IM-0000-0009.png: empty file"):
        cached_decode(paths, 16, 10**8, False, tmp_path / "cache")


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, caplog):
    write_folder(tmp_path / "f", {"test": 4}, size=32)
    paths = sorted(str(p) for p in (tmp_path / "f").rglob("*.png"))
    cache = tmp_path / "cache"
    images = np.array(cached_decode(paths, 16, 10**8, False, cache)[0])
    (entry,) = cache.iterdir()
    data = (entry / "images.npy").read_bytes()
    (entry / "images.npy").write_bytes(data[: len(data) // 2])  # cut short, as a full disk would
    again, _ = cached_decode(paths, 16, 10**8, False, cache)
    assert np.array_equal(again, images) and "is damaged" in caplog.text
    flipped = bytearray((entry / "images.npy").read_bytes())
    flipped[-1] ^= 0xFF  # one byte altered: the checksum notices
    (entry / "images.npy").write_bytes(bytes(flipped))
    assert np.array_equal(cached_decode(paths, 16, 10**8, False, cache)[0], images)


def test_dicom_size_is_checked_from_the_header_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", RAMP)
    with pytest.raises(BadImageError, match="4096 pixels is more than data.max_pixels \\(4000\\)"):
        load_image(path, 64, max_pixels=4000)
    assert load_image(path, 64, max_pixels=4096).shape == (64, 64)


@pytest.mark.parametrize("window", [("zzzzz", "400"), ("40", "")])
def test_dicom_with_unusable_display_settings_is_a_bad_image(tmp_path, window):
    pydicom = pytest.importorskip("pydicom")
    path = write_dicom(tmp_path / "w.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.add_new(0x00281050, "DS", "0")  # WindowCenter, then overwritten with junk below
    ds.add_new(0x00281051, "DS", "1")
    ds[0x00281050]._value, ds[0x00281051]._value = window  # written as is, as a broken writer would
    ds.save_as(path)
    with pytest.raises(BadImageError, match="w.dcm"):
        load_image(path, 64)


def test_non_numeric_rescale_slope_is_a_bad_image(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    path = write_dicom(tmp_path / "s.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds[0x00281053]._value = "abc"  # RescaleSlope
    ds.save_as(path)
    with pytest.raises(BadImageError, match="s.dcm"):
        load_image(path, 64)
