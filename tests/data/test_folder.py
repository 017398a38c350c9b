import numpy as np
import pytest

from conftest import KERMANY224, needs_shared
from pneumo.core.errors import PneumoError
from pneumo.data.folder import list_split, patient_id, patient_split
from pneumo.data.synthetic import write_folder


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1234_bacteria_5678.jpeg", "person1234"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("NORMAL2-IM-0117-0002.jpeg", "IM-0117"),
        ("/some/dir/IM-0005-0001.png", "IM-0005"),
        ("00001299_003.png", "00001299"),
        ("scan_42.png", "scan_42"),
    ],
)
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def test_list_split_reads_labels_from_folders(tmp_path):
    write_folder(tmp_path, {"train": 10}, size=32)
    paths, labels = list_split(tmp_path, "train")
    assert len(paths) == 10
    assert all(("PNEUMONIA" in p) == bool(y) for p, y in zip(paths, labels, strict=True))
    assert paths[:5] == sorted(paths[:5])


def test_list_split_errors(tmp_path):
    with pytest.raises(PneumoError, match="data folder .* does not exist"):
        list_split(tmp_path / "nope", "train")
    with pytest.raises(PneumoError, match="split 'test' not found"):
        list_split(tmp_path, "test")
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(PneumoError, match="PNEUMONIA does not exist"):
        list_split(tmp_path, "train")
    (tmp_path / "train" / "PNEUMONIA").mkdir()
    (tmp_path / "train" / "PNEUMONIA" / "notes.txt").write_text("not an image")
    with pytest.raises(PneumoError, match="holds no images"):
        list_split(tmp_path, "train")


def test_patient_split_keeps_patients_whole_and_classes_balanced():
    rng = np.random.default_rng(0)
    patients = [f"p{rng.integers(0, 300)}" for _ in range(1000)]
    labels = np.array([int(p[1:]) % 4 != 0 for p in patients])  # each patient has one label, 75% positive
    is_val = patient_split(patients, labels, 0.2, seed=3)
    val_patients = {p for p, v in zip(patients, is_val, strict=True) if v}
    train_patients = {p for p, v in zip(patients, is_val, strict=True) if not v}
    assert not val_patients & train_patients
    for label in (0, 1):
        share = is_val[labels == label].mean()
        assert 0.2 <= share < 0.25, share  # stops at the first patient that reaches the fraction
    assert np.array_equal(is_val, patient_split(patients, labels, 0.2, seed=3))
    assert not np.array_equal(is_val, patient_split(patients, labels, 0.2, seed=4))


@needs_shared
def test_real_train_split_has_no_patient_on_both_sides():
    paths, labels = list_split(KERMANY224, "train")
    assert (len(paths), int(labels.sum())) == (5216, 3875)
    patients = [patient_id(p) for p in paths]
    is_val = patient_split(patients, labels, 0.15, seed=0)
    val = {p for p, v in zip(patients, is_val, strict=True) if v}
    train = {p for p, v in zip(patients, is_val, strict=True) if not v}
    assert not val & train
    assert 0.14 < is_val.mean() < 0.17
    # Patients with several images exist, so a per-image split would have leaked some.
    assert len(set(patients)) < len(patients) * 0.7
