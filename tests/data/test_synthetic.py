import numpy as np
from sklearn.metrics import roc_auc_score

from pneumo.data.synthetic import make_split


def test_deterministic_and_independent_of_split_size():
    a, la = make_split("train", 6, 64, 0.5, seed=1)
    b, lb = make_split("train", 6, 64, 0.5, seed=1)
    c, _ = make_split("train", 3, 64, 0.5, seed=1)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert np.array_equal(a[:3], c)
    assert not np.array_equal(a, make_split("train", 6, 64, 0.5, seed=2)[0])
    assert not np.array_equal(a, make_split("val", 6, 64, 0.5, seed=1)[0])


def test_looks_like_an_xray():
    images, labels = make_split("val", 8, 128, 0.5, seed=0)
    assert images.dtype == np.uint8 and images.shape == (8, 128, 128)
    assert set(labels[:2]) == {0, 1}
    img = images.astype(float)
    lungs = img[:, 40:80, 20:40].mean()  # left lung field
    spine = img[:, 40:80, 60:68].mean()
    outside = img[:, :, :4].mean()  # beside the body
    assert spine > lungs > outside


def test_brightness_alone_does_not_give_the_answer():
    images, labels = make_split("train", 300, 64, 0.5, seed=0)
    assert 0.4 < labels.mean() < 0.6
    # Opacities add light inside the lungs, yet whole-image brightness alone must not give the answer.
    brightness_auc = roc_auc_score(labels, images.reshape(300, -1).mean(1))
    assert brightness_auc < 0.75, brightness_auc
    # (That a CNN does separate them is shown in test_engine and test_end_to_end.)
