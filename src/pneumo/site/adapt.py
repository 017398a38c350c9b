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
from pneumo.core.logs import log
from pneumo.data.folder import list_classes, patient_id
from pneumo.data.images import decode_all
from pneumo.data.manifest import read_manifest
from pneumo.evaluate.metrics import binary_metrics, bootstrap_ci, bootstrap_unit, calibration_metrics, operating_points
from pneumo.model import calibration
from pneumo.model.checkpoint import TrainedModel
from pneumo.site.finetune import Recipe, fine_tune

MIN_PER_CLASS = 10  # two parameters and a threshold from fewer images of a class would be a guess
TRUSTED_PER_CLASS = 50  # below this the sample's figures carry wide intervals: say so
PRIOR = 1.0  # weight, in images, of the pull towards the current calibration
# A sample this much out of the input model's scope is another population: the model fine-tuned on it
# is adapted away from its training images.
FOREIGN = 0.5


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


@dataclass(frozen=True)
class Options:
    method: str = "platt"  # the calibration map: platt or temperature
    choice: str = "auto"  # auto: whichever of CANDIDATES cross-validates best; or one of them
    folds: int = 5  # cross-validation over whole patients
    recipe: Recipe = Recipe()
    bootstrap: int = 1000  # patient-level resamples for the intervals
    seed: int = 0


CANDIDATES = ("recalibrate", "fine-tune")


@dataclass
class Result:
    model: TrainedModel  # the adapted model, ready to save
    kept: str  # which of CANDIDATES it is
    before: dict  # the sample's metrics with the model as it was
    # Each candidate's cross-validated metrics: every patient's images scored by a model adapted on the
    # other folds only. The honest estimate of what the candidate does on the site's next images.
    cross_validated: dict[str, dict]
    after: dict  # the kept model on the sample it was fitted on: optimistic
    warnings: list[str]
    # The share of the sample the input model's applicability check flags (None: it has none).
    out_of_scope: float | None = None


def adapt(model: TrainedModel, sample: Sample, options: Options = Options()) -> Result:
    """Adapt `model` to the site of `sample`, by recalibration or fine-tuning as cross-validation over
    the sample's patients chooses (or as `options.choice` says); the input model is left as it was."""
    z, scope = model.scored(sample.images, desc="scoring the sample")
    out_of_scope = None if scope is None else float(np.mean(model.applicability.flags(scope)))
    report = _Report(sample, options.bootstrap, options.seed)
    before = report.metrics(calibration.probabilities(z, calibration.Calibration()), model.threshold)
    candidates = _viable(options.choice, before, out_of_scope)
    folds = patient_folds(sample, options.folds, options.seed)
    # Each candidate's logits of every image from a model that never saw its patient (recalibration
    # leaves the network as it is: its logits are the model's own), and the fold's fine-tuned networks.
    held_out = {name: _held_out_logits(name, model, z, sample, folds, options) for name in candidates}
    raw = {name: logits for name, (logits, _) in held_out.items()}
    threshold = equal_odds_threshold(sample.labels)
    cross_validated = {
        name: report.metrics(_cross_validated(raw[name], sample.labels, folds, options.method), threshold)
        for name in candidates
    }
    kept = max(candidates, key=lambda name: cross_validated[name]["auc"])  # a tie keeps the first: recalibrate
    if kept == "recalibrate":
        adapted = _recalibrated(model, z, sample, options)
    else:
        adapted = _fine_tuned(model, *held_out[kept], sample, folds, options)
        # Fine-tuned on another population, the network may rank its own training images at chance: its
        # check says so of images more typical of those than of the site's.
        if out_of_scope is not None and out_of_scope >= FOREIGN:
            adapted.applicability = adapted.applicability.leaving(model.applicability)
    record = {**_record(model, sample, options), "kept": kept, "cross_validated": _plain(cross_validated)}
    adapted = replace(adapted, provenance={**model.provenance, "site_adaptation": record}, path=None, model_id="")
    return Result(
        model=adapted,
        kept=kept,
        before=before,
        cross_validated=cross_validated,
        after=report.metrics(_probabilities(adapted, sample), adapted.threshold),
        warnings=_warnings(sample),
        out_of_scope=out_of_scope,
    )


def _viable(choice: str, before: dict, out_of_scope: float | None) -> tuple[str, ...]:
    """The candidates to cross-validate. Recalibration keeps the model's ranking, so it is out when the
    sample ranks the other way round (its AUC below 0.5, the whole patient-level interval too). If the
    applicability check says the sample looks like the model's training images, the likelier cause is a
    sample with swapped labels, and nothing is fitted; at a site unlike them, the model just does not
    transfer, and fine-tuning may still learn the site."""
    auc, interval = before["auc"], before.get("ci95", {}).get("auc")
    opposite = (interval[1] if interval else auc) < 0.5
    if opposite and (choice == "recalibrate" or out_of_scope is None or out_of_scope < FOREIGN):
        raise PneumoError(
            f"the sample ranks opposite to the model (AUC {auc:.3f}): are its NORMAL and PNEUMONIA labels "
            "swapped? If not, this model is of no use here and calibration cannot help (docs/new-site.md)"
        )
    candidates = CANDIDATES if choice == "auto" else (choice,)
    return tuple(c for c in candidates if not (opposite and c == "recalibrate"))


def patient_folds(sample: Sample, k: int, seed: int) -> np.ndarray:
    """The cross-validation fold (0..k-1) of each image: whole patients, each fold with about the same
    share of pneumonia. Too few patients of a class to give every fold one stops here."""
    from sklearn.model_selection import StratifiedGroupKFold

    for label in (0, 1):
        n = len({p for p, y in zip(sample.patients, sample.labels, strict=True) if y == label})
        if n < k:
            raise PneumoError(
                f"the sample holds {n} {CLASSES[label]} patients: cross-validation over {k} folds needs at least "
                f"{k} patients of each class (fewer folds: --folds)"
            )
    folds = np.empty(len(sample.labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(splitter.split(sample.images[:, :1, 0], sample.labels, sample.patients)):
        folds[held] = f
    return folds


def _held_out_logits(name: str, model: TrainedModel, z: np.ndarray, sample: Sample, folds, options: Options):
    """(each image's logit from candidate `name` fitted on the other folds, the networks fine-tuned for
    the folds); fine-tuned networks come with no calibration of their own."""
    if name == "recalibrate":
        return z, []
    out, networks = np.empty(len(sample.labels)), []
    for f in range(options.folds):
        log.info("fine-tuning for fold %d of %d", f + 1, options.folds)
        held = folds == f
        members = fine_tune(model, sample.images[~held], sample.labels[~held], options.recipe, options.seed)
        tuned = replace(model, members=members, calibration=calibration.Calibration(), applicability=None)
        out[held] = tuned.logits(sample.images[held], desc="scoring the held-out fold")
        networks += members
    return out, networks


def _recalibrated(model: TrainedModel, z: np.ndarray, sample: Sample, options: Options) -> TrainedModel:
    """The model with its calibration refitted on the sample and the equal-odds threshold. Its network,
    and so what it has seen, is unchanged: it keeps its applicability check."""
    site, threshold = fit_site(z, sample.labels, options.method)
    return replace(
        model,
        calibration=model.calibration.then(site),
        threshold=threshold,
        threshold_method="site: equal odds at the sample's prevalence",
        operating_points=operating_points(sample.labels, calibration.probabilities(z, site)),
    )


def _fine_tuned(
    model: TrainedModel, oof: np.ndarray, networks: list, sample: Sample, folds: np.ndarray, options: Options
) -> TrainedModel:
    """The ensemble of the networks fine-tuned for the cross-validation folds, each on all of the sample
    but one fold: it ranked the site's other images better than one network fine-tuned on the whole
    sample (docs/new-site.md), and costs no fine-tuning more. Its calibration is fitted on the
    cross-validated logits `oof` (a network's logits on images it learned are overconfident), and its
    applicability check describes the site's images: they are now what it has seen."""
    site, threshold = fit_site(oof, sample.labels, options.method)
    tuned = replace(
        model,
        members=networks,
        calibration=site,
        threshold=threshold,
        threshold_method="site: equal odds at the sample's prevalence",
        operating_points=operating_points(sample.labels, calibration.probabilities(oof, site)),
        epoch=0,
        applicability=None,
    )
    tuned.fit_applicability(sample.images[folds != 0], sample.images[folds == 0])
    return tuned


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
        chosen = draw_patients(rng, labels, patients, per_class)
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


def draw_patients(rng: np.random.Generator, labels: np.ndarray, patients: np.ndarray, per_class: int) -> np.ndarray:
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


def _cross_validated(z: np.ndarray, labels: np.ndarray, folds: np.ndarray, method: str) -> np.ndarray:
    """Each fold's probabilities from a calibration and threshold fitted on the other folds only,
    shifted so that the full sample's threshold makes the same decisions as that fold's threshold."""
    target = calibration.logit(equal_odds_threshold(labels))
    out = np.empty(len(z))
    for f in np.unique(folds):
        held = folds == f
        site, fold = fit_site(z[~held], labels[~held], method)
        out[held] = site.apply(z[held]) - calibration.logit(fold) + target
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


def _probabilities(model: TrainedModel, sample: Sample) -> np.ndarray:
    return calibration.probabilities(model.logits(sample.images, desc="scoring the sample"), calibration.Calibration())


def _record(model: TrainedModel, sample: Sample, options: Options) -> dict:
    """What an adaptation did, on what: kept in the new checkpoint's provenance."""
    return {
        "calibration_method": options.method,
        "folds": options.folds,
        "fine_tuning": options.recipe.to_dict(),
        "n": len(sample.labels),
        "n_pneumonia": int(sample.labels.sum()),
        "n_normal": int((sample.labels == 0).sum()),
        "patients": len(set(sample.patients)),
        "files_sha256": sample.digest(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "from_model": model.model_id,
        "from_calibration": model.calibration.to_dict(),
    }


def _plain(figures: dict[str, dict]) -> dict[str, dict]:
    """The numbers of each candidate's metrics, as plain floats (a checkpoint holds data, not NumPy)."""
    return {
        name: {k: float(v) for k, v in m.items() if isinstance(v, (int, float, np.floating))}
        for name, m in figures.items()
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
