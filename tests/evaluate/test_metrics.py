import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from pneumo.core.errors import PneumoError
from pneumo.evaluate.metrics import (
    banded_auc,
    bce,
    binary_metrics,
    bootstrap_ci,
    calibration_metrics,
    choose_threshold,
    format_table,
    operating_points,
)

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.3, 0.6, 0.2, 0.8, 0.7, 0.4, 0.9, 0.65, 0.55])


def test_metrics_by_hand():
    m = binary_metrics(LABELS, PROBS, 0.5)
    # predicted positive: 0.6 (a normal), 0.8, 0.7, 0.9, 0.65, 0.55 -> tp 5, fp 1, fn 1 (0.4), tn 3
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(5 / 6)
    # AUC: of 24 (normal, pneumonia) pairs the pneumonia image scores higher in 22: only the normal
    # 0.6 beats two pneumonia scores (0.4, 0.55).
    assert m["auc"] == pytest.approx(22 / 24)
    assert (m["n"], m["n_pneumonia"], m["n_normal"]) == (10, 6, 4)


def test_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = binary_metrics(y, p, 0.45)
    pred = p >= 0.45
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, ~pred))


def test_thresholds():
    assert choose_threshold(LABELS, PROBS, "fixed", 0.3) == 0.3
    # Youden's J = sensitivity + specificity - 1: 0.667 at 0.65 (4/6, 4/4), 0.583 at 0.55 (5/6, 3/4),
    # 0.75 at 0.4 (6/6, 3/4): the best. The threshold sits halfway to the next lower score, 0.3.
    assert choose_threshold(LABELS, PROBS, "youden") == pytest.approx(0.35)
    assert (
        binary_metrics(LABELS, PROBS, 0.35)["confusion_matrix"]
        == binary_metrics(LABELS, PROBS, 0.4)["confusion_matrix"]
    )
    t = choose_threshold(LABELS, PROBS, "max_f1")
    best = max(binary_metrics(LABELS, PROBS, p)["f1"] for p in PROBS)
    assert binary_metrics(LABELS, PROBS, t)["f1"] == pytest.approx(best)
    assert not np.isclose(PROBS, t).any()  # no score on the boundary
    # When the lowest score is chosen (all positive: F1 0.8, against 0.5 at 0.2), halfway down to 0.
    assert choose_threshold(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), "max_f1") == pytest.approx(0.05)


def test_balanced_threshold_equalizes_sensitivity_and_specificity():
    def gap(t):
        m = binary_metrics(LABELS, PROBS, t)
        return abs(m["sensitivity"] - m["specificity"])

    t = choose_threshold(LABELS, PROBS, "balanced")
    # Here 5/6 against 3/4 or 4/6 against 3/4 at best; the tie goes to the higher threshold (0.6),
    # set halfway down to the next score: 0.575.
    assert gap(t) == pytest.approx(min(gap(p) for p in PROBS)) == pytest.approx(1 / 12)
    assert t == pytest.approx(0.575)


def test_one_class_is_an_error():
    with pytest.raises(PneumoError, match="one class only"):
        binary_metrics(np.ones(5), np.linspace(0, 1, 5), 0.5)
    with pytest.raises(PneumoError, match="one class only"):
        choose_threshold(np.zeros(5), np.linspace(0, 1, 5), "youden")


def test_bce_matches_the_formula():
    assert bce(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)


def test_table_shows_every_metric():
    table = format_table(binary_metrics(LABELS, PROBS, 0.5))
    for word in ("ROC AUC", "F1", "accuracy", "sensitivity", "specificity", "precision", "threshold", "true PNEUMONIA"):
        assert word in table


def test_operating_points_meet_their_targets_on_validation():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + rng.random(400) * 0.65, 0, 1)
    points = operating_points(y, p)
    assert set(points) == {
        "sensitivity>=0.90",
        "sensitivity>=0.95",
        "sensitivity>=0.99",
        "specificity>=0.90",
        "specificity>=0.95",
    }
    for name, threshold in points.items():
        measure, target = name.split(">=")
        m = binary_metrics(y, p, threshold)
        assert m[measure] >= float(target)
        # ...and is the highest threshold that does (sensitivity) / the lowest (specificity): moved past
        # the next score in that direction, the target is missed.
        beyond = p[p > threshold].min() + 1e-9 if measure == "sensitivity" else p[p < threshold].max() - 1e-9
        assert binary_metrics(y, p, beyond)[measure] < float(target), name
        assert not np.isclose(p, threshold).any()


def test_calibration_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.3, 0.8, 0.4])
    c = calibration_metrics(y, p, bins=2)
    # bin [0, 0.5): p 0.1, 0.3, 0.4, mean 0.2667, 1/3 positive; bin [0.5, 1]: p 0.8, all positive.
    assert c["ece"] == pytest.approx(0.75 * abs(0.8 / 3 - 1 / 3) + 0.25 * abs(0.8 - 1))
    assert c["brier"] == pytest.approx((0.01 + 0.09 + 0.04 + 0.36) / 4)
    assert [b["n"] for b in c["reliability"]] == [3, 1]


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(0)

    def width(n):
        y = rng.integers(0, 2, n)
        p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
        ci = bootstrap_ci(y, p, 0.5, resamples=300, seed=0)
        m = binary_metrics(y, p, 0.5)
        for k, (lo, hi) in ci.items():
            assert lo <= m[k] <= hi, k
        return ci["auc"][1] - ci["auc"][0]

    assert width(1600) < width(100) / 2.5  # about 1/sqrt(n)
    y = np.array([0, 1] * 20)
    p = np.linspace(0, 1, 40)
    assert bootstrap_ci(y, p, 0.5, 100, seed=3) == bootstrap_ci(y, p, 0.5, 100, seed=3)


def test_midpoint_threshold_sits_between_the_class_medians_in_logit_space():
    def sigmoid(x):
        return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))

    y = np.array([0, 0, 0, 1, 1, 1])
    p = sigmoid([-6, -4, -1, 0, 2, 8])  # medians -4 and 2: halfway is -1
    assert choose_threshold(y, p, "midpoint") == pytest.approx(sigmoid(-1))
    # Unlike the tail-fitted rules, it ignores where the closest cases of the two classes happen to fall.
    moved = sigmoid([-6, -4, -3.5, -3, 2, 8])
    assert choose_threshold(y, moved, "midpoint") == pytest.approx(sigmoid(-1))
    assert choose_threshold(y, moved, "balanced") != pytest.approx(choose_threshold(y, p, "balanced"))


def test_bootstrap_resamples_whole_patients():
    from pneumo.evaluate.metrics import bootstrap_unit

    rng = np.random.default_rng(0)
    # 40 patients with 5 near-identical images each: 200 images, but only 40 independent cases.
    patient_scores = rng.random(40)
    labels = np.repeat((patient_scores > 0.5).astype(int), 5)
    labels[:5] = 1 - labels[:5]  # one patient's images all misread
    probs = np.repeat(patient_scores, 5) + rng.normal(0, 0.01, 200)
    groups = np.repeat(np.arange(40), 5)
    by_image = bootstrap_ci(labels, probs, 0.5, 500, 0)
    by_patient = bootstrap_ci(labels, probs, 0.5, 500, 0, groups)
    width = lambda ci: ci["accuracy"][1] - ci["accuracy"][0]
    assert width(by_patient) > 1.5 * width(by_image)  # honest intervals are wider
    assert bootstrap_unit(groups, 200) == "patients" and bootstrap_unit(np.arange(200), 200) == "images"
    assert bootstrap_unit(None, 200) == "images"


def test_bootstrap_with_no_two_class_resample_gives_no_interval():
    # Two images, one resample: at best half the time both classes are drawn; here (seed 0) they are not.
    assert bootstrap_ci(np.array([0, 1]), np.array([0.2, 0.8]), 0.5, resamples=1, seed=0) == {}


def test_banded_auc_leaves_out_what_the_nuisance_explains():
    # Positives are bright, and within each brightness band the scores rank them the wrong way round.
    grey = np.array([0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9])
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    scores = grey * 10 - labels  # brightness ranks; within a band, the positive scores lower
    assert roc_auc_score(labels, scores) == pytest.approx(0.25)  # the bright positives beat the dark negatives
    assert banded_auc(labels, scores, grey, bands=2) == 0.0
    assert banded_auc(labels, labels + grey, grey, bands=2) == 1.0
    assert np.isnan(banded_auc(np.array([1, 0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]), bands=2))
