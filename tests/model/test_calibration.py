import numpy as np
import pytest

from pneumo.evaluate.metrics import calibration_metrics
from pneumo.model import calibration
from pneumo.model.calibration import Calibration


def logistic_sample(n: int, scale: float, bias: float, seed: int = 0):
    """Logits z and labels drawn with P(y = 1 | z) = sigmoid(scale * z + bias)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(scale * z + bias)))).astype(int)
    return z, y


def test_platt_recovers_the_true_map():
    z, y = logistic_sample(20000, 0.5, 1.5)
    fitted = calibration.fit(z, y, "platt")
    assert fitted.scale == pytest.approx(0.5, abs=0.03) and fitted.bias == pytest.approx(1.5, abs=0.06)


def test_temperature_fits_the_scale_only():
    z, y = logistic_sample(20000, 0.5, 0.0)
    fitted = calibration.fit(z, y, "temperature")
    assert fitted.bias == 0 and fitted.scale == pytest.approx(0.5, abs=0.03)


def test_calibration_lowers_the_error_and_keeps_the_order():
    z, y = logistic_sample(4000, 0.4, -1.0, seed=1)
    raw = calibration.probabilities(z, Calibration())
    fitted = calibration.fit(z, y, "platt")
    calibrated = calibration.probabilities(z, fitted)
    assert calibration_metrics(y, calibrated)["ece"] < 0.03 < calibration_metrics(y, raw)["ece"]
    assert (np.argsort(calibrated, kind="stable") == np.argsort(raw, kind="stable")).all()


def test_separable_small_samples_give_a_finite_cautious_map():
    z = np.array([-5.0, -4, -3, -2, 2, 3, 4, 5])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    fitted = calibration.fit(z, y, "platt", prior=1.0)
    assert np.isfinite(fitted.scale) and 0 < fitted.scale < 5
    assert calibration.probabilities(np.array([5.0]), fitted)[0] < 0.99  # Platt's targets: never certain


def test_maps_compose():
    first, then = Calibration("platt", 2.0, 1.0), Calibration("platt", 0.5, -3.0)
    z = np.linspace(-4, 4, 9)
    assert np.allclose(first.then(then).apply(z), then.apply(first.apply(z)))
    assert Calibration.from_dict(first.to_dict()) == first


def test_a_ranking_the_wrong_way_round_gets_a_flat_map_never_an_inverted_one():
    import numpy as np

    from pneumo.model.calibration import MIN_SCALE, Calibration, fit, probabilities

    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(int)
    logits = -3.0 * labels + rng.normal(size=400)  # pneumonia scored lower: inverted
    for method in ("platt", "temperature"):
        cal = fit(logits, labels, method)
        assert cal.scale == MIN_SCALE and Calibration.from_dict(cal.to_dict()) == cal
    probs = probabilities(logits, fit(logits, labels, "platt"))
    assert abs(probs.mean() - labels.mean()) < 0.02 and probs.std() < 0.01  # the base rate, for every image
