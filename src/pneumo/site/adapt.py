"""Adapting a trained model to a new site from a small labelled sample of that site's images.

The model's ranking usually survives a move to another hospital; its probabilities and its threshold
do not (another scanner or grading batch shifts the scores). `calibrate` refits the map from the
model's logit to the probability on the site's sample (Platt or temperature scaling, held towards the
current map so that a small sample moves it cautiously), and puts the decision threshold where an
image is equally likely to be a pneumonia as a normal image by that refitted map: the point of equal
error costs, read off a smooth fit of all the sample rather than off its few closest cases.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pneumo.core.errors import PneumoError
from pneumo.core.labels import CLASSES
from pneumo.data.folder import list_classes, patient_id
from pneumo.data.images import decode_all
from pneumo.data.manifest import read_manifest
from pneumo.evaluate.metrics import binary_metrics, bootstrap_ci, bootstrap_unit, calibration_metrics, operating_points
from pneumo.model import calibration
from pneumo.model.checkpoint import TrainedModel

MIN_PER_CLASS = 10  # two parameters and a threshold from fewer images of a class would be a guess
TRUSTED_PER_CLASS = 50  # below this the sample's figures carry wide intervals: say so
PRIOR = 1.0  # weight, in images, of the pull towards the current calibration


@dataclass
class Sample:
    """A site's labelled images, decoded as the model reads them."""

    paths: list[str]
    labels: np.ndarray
    patients: list[str]
    images: np.ndarray = field(repr=False)

    def digest(self) -> str:
        """SHA-256 of the sorted list of (path, label): which sample a calibration was fitted on."""
        lines = sorted(f"{p}\t{int(y)}" for p, y in zip(self.paths, self.labels, strict=True))
        return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def load_sample(inputs: list[str], size: int, max_pixels: int) -> Sample:
    """Labelled images from folders (with NORMAL/ and PNEUMONIA/ inside) and CSV manifests
    (path,label[,patient_id]); each file once. An unreadable file stops here, named."""
    rows: dict[str, tuple[int, str]] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths, labels = list_classes(p, f"labelled folder {p}")
            rows.update({str(Path(q).resolve()): (int(y), patient_id(q)) for q, y in zip(paths, labels, strict=True)})
        elif p.suffix.lower() == ".csv" and p.is_file():
            rows.update({r.path: (r.label, r.patient) for r in read_manifest(p)})
        else:
            raise PneumoError(f"{item} is neither a folder with NORMAL and PNEUMONIA subfolders nor a CSV manifest")
    paths = sorted(rows)
    labels = np.array([rows[p][0] for p in paths], dtype=np.int64)
    _require_enough(labels)
    images, _ = decode_all(paths, size, max_pixels, skip_bad=False, desc="decoding the sample")
    return Sample(paths, labels, [rows[p][1] for p in paths], images)


def _require_enough(labels: np.ndarray) -> None:
    counts = [int(np.sum(labels == k)) for k in (0, 1)]
    if min(counts) == 0:
        only = CLASSES[int(labels[0])] if len(labels) else "no"
        raise PneumoError(f"the sample holds {only} images only: calibration needs both NORMAL and PNEUMONIA images")
    if min(counts) < MIN_PER_CLASS:
        raise PneumoError(
            f"the sample holds {counts[0]} NORMAL and {counts[1]} PNEUMONIA images: calibration needs at least "
            f"{MIN_PER_CLASS} of each"
        )


@dataclass
class Result:
    model: TrainedModel  # the calibrated model, ready to save
    before: dict  # the sample's metrics with the model as it was
    after: dict  # ... with the new calibration and threshold (fitted on this very sample: optimistic)
    after_cross_validated: dict  # ... each patient's images scored by a calibration fitted without them
    warnings: list[str]
    # The share of the sample the applicability check flags (None: the model has none). Recalibrating
    # leaves the network, and so what it has seen, as it was: the new model keeps the check unchanged.
    out_of_scope: float | None = None


def calibrate(
    model: TrainedModel, sample: Sample, method: str = "platt", bootstrap: int = 1000, seed: int = 0
) -> Result:
    """Refit the model's calibration and threshold on `sample`; the input model is left as it was."""
    z, scope = model.scored(sample.images, desc="scoring the sample")
    report = _Report(sample, bootstrap, seed)
    before = report.metrics(calibration.probabilities(z, calibration.Calibration()), model.threshold)
    _require_a_ranking(before)
    site, threshold = fit_site(z, sample.labels, method)
    if model.calibration.then(site).scale <= 0:
        raise PneumoError("the sample's labels run against the model's scores: calibrating would invert the model")
    after_probs = calibration.probabilities(z, site)
    calibrated = replace(
        model,
        calibration=model.calibration.then(site),
        threshold=threshold,
        threshold_method="site: equal odds at the sample's prevalence",
        operating_points=operating_points(sample.labels, after_probs),
        provenance={**model.provenance, "site_calibration": _record(model, sample, method)},
        path=None,
        model_id="",
    )
    return Result(
        model=calibrated,
        before=before,
        after=report.metrics(after_probs, threshold),
        after_cross_validated=report.metrics(_cross_validated(z, sample, method), threshold),
        warnings=_warnings(sample),
        out_of_scope=None if scope is None else float(np.mean(model.applicability.flags(scope))),
    )


def _require_a_ranking(before: dict) -> None:
    """Calibration keeps the model's ranking. A sample that ranks the other way round (its AUC below
    0.5, the whole patient-level interval too when there is one) has swapped labels, or meets a model
    of no use at this site: either way no calibration helps, and fitting one would invert the model."""
    auc, interval = before["auc"], before.get("ci95", {}).get("auc")
    if (interval[1] if interval else auc) < 0.5:
        raise PneumoError(
            f"the sample ranks opposite to the model (AUC {auc:.3f}): are its NORMAL and PNEUMONIA labels "
            "swapped? If not, this model is of no use here and calibration cannot help (docs/new-site.md)"
        )


def fit_site(z: np.ndarray, labels: np.ndarray, method: str = "platt") -> tuple[calibration.Calibration, float]:
    """The site's calibration of the logits `z` and its decision threshold (in probability)."""
    return calibration.fit(z, labels, method, prior=PRIOR), equal_odds_threshold(labels)


def simulate(z: np.ndarray, labels: np.ndarray, patients: list[str], draws: int = 200, per_class: int = 20) -> dict:
    """What calibrating on a sample of `per_class` images of each class (whole patients) and scoring
    the site's other images would give, over `draws` random samples: the mean, worst and 5th-percentile
    accuracy of the draws, and their mean sensitivity and specificity."""
    rng = np.random.default_rng(0)
    patients = np.asarray(patients)
    accuracies, sens, spec = [], [], []
    for _ in range(draws):
        chosen = _draw_patients(rng, labels, patients, per_class)
        held = np.isin(patients, patients[chosen])
        site, threshold = fit_site(z[chosen], labels[chosen])
        m = binary_metrics(labels[~held], calibration.probabilities(z[~held], site), threshold)
        accuracies.append(m["accuracy"])
        sens.append(m["sensitivity"])
        spec.append(m["specificity"])
    a = np.array(accuracies)
    return {
        "draws": draws,
        "per_class": per_class,
        "accuracy_mean": float(a.mean()),
        "accuracy_min": float(a.min()),
        "accuracy_p05": float(np.quantile(a, 0.05)),
        "sensitivity_mean": float(np.mean(sens)),
        "specificity_mean": float(np.mean(spec)),
    }


def _draw_patients(rng: np.random.Generator, labels: np.ndarray, patients: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of `per_class` images of each class, taken patient by patient in a random order (a
    patient whose images would overshoot the count is passed over)."""
    chosen: list[int] = []
    for label in (0, 1):
        taken = 0
        for p in rng.permutation(np.unique(patients[labels == label])):
            idx = np.flatnonzero((patients == p) & (labels == label))
            if taken + len(idx) <= per_class:
                chosen += idx.tolist()
                taken += len(idx)
            if taken == per_class:
                break
    return np.array(chosen)


def equal_odds_threshold(labels: np.ndarray) -> float:
    """Calibrated on a sample of prevalence pi, a probability equal to pi means a likelihood ratio of 1:
    the image is as typical of pneumonia as of a normal chest. That is where errors of both kinds weigh
    the same, whatever the site's prevalence."""
    return float(np.mean(labels))


def _cross_validated(z: np.ndarray, sample: Sample, method: str) -> np.ndarray:
    """Each patient's probabilities from a calibration and threshold fitted on the other patients only,
    shifted so that the full sample's threshold makes the same decisions as that fold's threshold."""
    patients = np.array(sample.patients)
    target = calibration.logit(equal_odds_threshold(sample.labels))
    out = np.empty(len(z))
    for p in np.unique(patients):
        held, rest = patients == p, patients != p
        site, fold = fit_site(z[rest], sample.labels[rest], method)
        fold_threshold = calibration.logit(fold)
        out[held] = site.apply(z[held]) - fold_threshold + target
    return calibration.probabilities(out, calibration.Calibration())


@dataclass
class _Report:
    sample: Sample
    bootstrap: int
    seed: int

    def metrics(self, probs: np.ndarray, threshold: float) -> dict:
        labels, patients = self.sample.labels, self.sample.patients
        m = {**binary_metrics(labels, probs, threshold), **calibration_metrics(labels, probs)}
        if self.bootstrap:
            m["ci95"] = bootstrap_ci(labels, probs, threshold, self.bootstrap, self.seed, patients)
            m["bootstrap_unit"] = bootstrap_unit(patients, len(labels))
        return m


def _record(model: TrainedModel, sample: Sample, method: str) -> dict:
    return {
        "method": method,
        "n": len(sample.labels),
        "n_pneumonia": int(sample.labels.sum()),
        "n_normal": int((sample.labels == 0).sum()),
        "patients": len(set(sample.patients)),
        "files_sha256": sample.digest(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "from_model": model.model_id,
        "from_calibration": model.calibration.to_dict(),
    }


def _warnings(sample: Sample) -> list[str]:
    counts = [int(np.sum(sample.labels == k)) for k in (0, 1)]
    if min(counts) >= TRUSTED_PER_CLASS:
        return []
    return [
        f"the sample holds {counts[0]} NORMAL and {counts[1]} PNEUMONIA images ({len(set(sample.patients))} patients): "
        f"too few to trust its figures to better than several points (see the intervals); "
        f"{TRUSTED_PER_CLASS} or more of each class give a steadier calibration"
    ]
