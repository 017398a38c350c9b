"""pneumo-calibrate: a model adapted to a site from a labelled sample of the site's images."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_failure, call
from pneumo.cli import calibrate_main, evaluate_main, predict_main
from pneumo.core.errors import PneumoError
from pneumo.core.fileio import file_sha256
from pneumo.data.synthetic import make_split
from pneumo.model.checkpoint import TrainedModel
from pneumo.site.adapt import MIN_PER_CLASS, Options, Sample, adapt, equal_odds_threshold, load_sample, patient_folds
from pneumo.site.finetune import Recipe


def site_folder(root, n_per_class: int, darken: float = 0.0, seed: int = 3):
    """A site's labelled folder of synthetic X-rays (32x32), optionally rendered darker than training's."""
    images, labels = make_split("test", 4 * n_per_class, 32, 0.5, seed=seed)
    counts = {0: 0, 1: 0}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if counts[int(label)] == n_per_class:
            continue
        counts[int(label)] += 1
        folder = root / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        shifted = np.clip(image.astype(float) * (1 - darken), 0, 255).astype(np.uint8)
        Image.fromarray(shifted).save(folder / f"{'person' if label else 'IM-'}{i:04d}_x.png")
    return root


QUICK = ("--steps", "6", "--folds", "3", "--bootstrap", "50")  # a fine-tuning of seconds on 32x32 images


def test_recalibration_refits_the_map_and_threshold_and_records_the_sample(tmp_path, trained_checkpoint):
    folder = site_folder(tmp_path / "site", 15, darken=0.3)
    before = file_sha256(trained_checkpoint)
    args = ("--checkpoint", trained_checkpoint, "--out", tmp_path / "site.pt", "--adapt", "recalibrate", *QUICK)
    result = call(calibrate_main, *args, folder)
    assert result.returncode == 0, result.stderr
    assert file_sha256(trained_checkpoint) == before  # the input checkpoint is untouched
    assert "warning: the sample holds 15 NORMAL and 15 PNEUMONIA" in result.stdout  # fewer than trusted
    for row in ("auc", "accuracy", "sensitivity", "specificity", "ece", "threshold", "recalibrate, cross-validated"):
        assert row in result.stdout
    assert "fine-tune, cross-validated" not in result.stdout and "kept recalibrate" in result.stdout
    site = TrainedModel.load(tmp_path / "site.pt")
    original = TrainedModel.load(trained_checkpoint)
    record = site.provenance["site_adaptation"]
    assert (record["n"], record["n_normal"], record["n_pneumonia"], record["folds"]) == (30, 15, 15, 3)
    assert len(record["files_sha256"]) == 64 and record["from_model"] == original.model_id and record["date"]
    assert record["kept"] == "recalibrate" and set(record["cross_validated"]) == {"recalibrate"}
    assert site.threshold == pytest.approx(0.5)  # equal odds on a balanced sample
    assert site.calibration != original.calibration and site.model_id != original.model_id
    assert all(torch.equal(v, original.members[0][k]) for k, v in site.members[0].items())  # the same network
    # The other commands take it like any checkpoint.
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(tmp_path / "site.pt"), "--out", str(out), str(folder)]) == 0
    assert call(evaluate_main, "--checkpoint", tmp_path / "site.pt", "--out", tmp_path / "e").returncode == 0
    # Recalibrating teaches the network nothing: it keeps its applicability check, and says what it flags.
    assert site.applicability.to_dict()["threshold"] == original.applicability.to_dict()["threshold"]
    assert re.search(r"out of the model's scope \(applicability check\): \d+\.\d% of the sample", result.stdout)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert 0 <= metrics["ood_share"] <= 1 and "applicability check flags" in (tmp_path / "e" / "report.md").read_text()


def test_fine_tuning_changes_the_network_and_its_applicability_check(tmp_path, trained_checkpoint):
    folder = site_folder(tmp_path / "site", 15, darken=0.3)
    args = ("--checkpoint", trained_checkpoint, "--out", tmp_path / "site.pt", "--adapt", "fine-tune", *QUICK)
    result = call(calibrate_main, *args, folder)
    assert result.returncode == 0, result.stderr
    assert "kept fine-tune" in result.stdout and "recalibrate, cross-validated" not in result.stdout
    site, original = TrainedModel.load(tmp_path / "site.pt"), TrainedModel.load(trained_checkpoint)
    record = site.provenance["site_adaptation"]
    assert record["kept"] == "fine-tune" and record["fine_tuning"]["steps"] == 6
    head = "head.3.weight"
    # One network fine-tuned per fold (three here), each without its fold: their ensemble is the model.
    assert len(site.members) == 3 and not torch.equal(site.members[0][head], original.members[0][head])
    assert not torch.equal(site.members[0][head], site.members[1][head])
    assert site.applicability.to_dict()["threshold"] != original.applicability.to_dict()["threshold"]
    # The check keeps the model's own training images as its origin only where the sample was mostly
    # out of their scope: a site like them is not a population the model was adapted away from.
    flagged = float(re.search(r"out of the model's scope \(applicability check\): ([\d.]+)%", result.stdout)[1])
    assert (site.applicability.origin is not None) == (flagged >= 50)


def test_the_sample_is_scored_before_and_cross_validated_with_patient_intervals(tmp_path, trained_checkpoint):
    model = TrainedModel.load(trained_checkpoint)
    sample = load_sample([str(site_folder(tmp_path / "site", 20, darken=0.4))], 32, 10**8)
    result = adapt(model, sample, Options(choice="recalibrate", folds=4, bootstrap=200))
    for m in (result.before, result.after, result.cross_validated["recalibrate"]):
        assert set(m["ci95"]) >= {"auc", "accuracy"} and m["bootstrap_unit"] == "images"
    assert result.after["auc"] == pytest.approx(result.before["auc"])  # a monotone map keeps the ranking
    # The new threshold balances the two errors where the old one, fitted to training's scores, may not.
    gap = lambda m: abs(m["sensitivity"] - m["specificity"])
    assert gap(result.after) <= gap(result.before) + 1e-9


def test_a_site_the_model_ranks_backwards_is_learned_by_fine_tuning(tmp_path, learned_run):
    """A site unlike anything the model saw (negatives of the synthetic X-rays) where its cue means the
    opposite (the labels swapped). Recalibration cannot help: it keeps the ranking. Fine-tuning learns
    the site, and cross-validation keeps it."""
    model = TrainedModel.load(learned_run[0])
    images, labels = make_split("test", 120, 64, 0.5, seed=5)
    site = Sample([f"x{i}" for i in range(120)], 1 - labels, [f"p{i}" for i in range(120)], 255 - images)
    result = adapt(model, site, Options(folds=3, recipe=Recipe(steps=60), bootstrap=0))
    assert result.before["auc"] < 0.5 and result.out_of_scope > 0.5
    assert result.kept == "fine-tune" and set(result.cross_validated) == {"fine-tune"}
    assert result.cross_validated["fine-tune"]["auc"] > 0.7  # where recalibration would stay below 0.3
    # Adapted away from its training images, the model's check flags them, and few of the site's.
    check = result.model.applicability
    assert check.origin is not None and set(check.origin) == {"thumbnail", "histogram", "texture"}
    home, _ = make_split("test", 100, 64, 0.5, seed=6)
    assert result.model.out_of_scope(home).mean() > 0.95
    assert result.model.out_of_scope(255 - make_split("test", 100, 64, 0.5, seed=7)[0]).mean() < 0.3


def test_patient_folds_keep_patients_together_and_balance_the_classes(tmp_path):
    labels = np.array([0] * 30 + [1] * 30)
    patients = [f"p{i // 3}" for i in range(60)]  # 3 images each: 10 patients per class
    sample = Sample([f"x{i}" for i in range(60)], labels, patients, np.zeros((60, 8, 8), np.uint8))
    folds = patient_folds(sample, 5, seed=0)
    for p in set(patients):
        assert len({folds[i] for i in range(60) if patients[i] == p}) == 1
    assert [int(labels[folds == f].sum()) for f in range(5)] == [6] * 5
    with pytest.raises(PneumoError, match="holds 10 NORMAL patients: cross-validation over 11 folds"):
        patient_folds(sample, 11, seed=0)


def test_csv_manifests_and_patient_ids(tmp_path, trained_checkpoint):
    folder = site_folder(tmp_path / "site", 12)
    rows = ["path,label,patient_id"]
    for i, f in enumerate(sorted(folder.rglob("*.png"))):
        rows.append(f"{f.relative_to(tmp_path)},{f.parent.name},p{i // 2}")
    (tmp_path / "sample.csv").write_text("\n".join(rows) + "\n")
    sample = load_sample([str(tmp_path / "sample.csv")], 32, 10**8)
    assert len(sample.labels) == 24 and len(set(sample.patients)) == 12
    result = adapt(TrainedModel.load(trained_checkpoint), sample, Options(choice="recalibrate", bootstrap=50))
    assert result.before["bootstrap_unit"] == "patients"


def test_equal_odds_threshold_is_the_sample_prevalence():
    assert equal_odds_threshold(np.array([0, 0, 0, 1])) == 0.25


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda d: site_folder(d, 12) and [p.unlink() for p in (d / "PNEUMONIA").iterdir()], "NORMAL images only"),
        (lambda d: site_folder(d, MIN_PER_CLASS - 1), f"needs at least {MIN_PER_CLASS} of each"),
        (lambda d: site_folder(d, 12) and (d / "NORMAL" / "IM-9999_x.png").write_text("junk"), "IM-9999_x.png"),
        (lambda d: (d / "NORMAL").mkdir(parents=True), "PNEUMONIA does not exist"),
    ],
)
def test_unusable_samples_are_one_sentence_and_exit_2(tmp_path, trained_checkpoint, make, phrase):
    make(tmp_path / "site")
    result = call(calibrate_main, "--checkpoint", trained_checkpoint, "--out", tmp_path / "new.pt", tmp_path / "site")
    assert_clean_failure(result, phrase)
    assert not (tmp_path / "new.pt").exists()


def test_no_input_is_ever_overwritten(tmp_path, trained_checkpoint):
    folder = site_folder(tmp_path / "site", 12)
    image = next(folder.rglob("*.png"))
    rows = "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in folder.rglob("*.png"))
    (tmp_path / "sample.csv").write_text("path,label\n" + rows)
    for out, sample, clash in [
        (trained_checkpoint, folder, "is --checkpoint too"),
        (tmp_path / "sample.csv", tmp_path / "sample.csv", "is the input"),
        (image, folder, "is the sample's image"),
    ]:
        before = Path(out).read_bytes()
        result = call(calibrate_main, "--checkpoint", trained_checkpoint, "--out", out, sample)
        assert_clean_failure(result, clash)
        assert Path(out).read_bytes() == before
    with pytest.raises(PneumoError, match="neither a folder"):
        load_sample([str(tmp_path / "nothing")], 32, 10**8)


def test_a_sample_with_swapped_labels_is_refused_not_fitted(tmp_path, learned_run):
    """NORMAL and PNEUMONIA swapped: a monotone calibration can only fit that by inverting the model,
    so the command refuses in one sentence (exit 2) and writes nothing."""
    folder = site_folder(tmp_path / "site", 15)
    (folder / "NORMAL").rename(folder / "was-normal")
    (folder / "PNEUMONIA").rename(folder / "NORMAL")
    (folder / "was-normal").rename(folder / "PNEUMONIA")
    model = learned_run[0]  # a model that ranks this kind of image well
    result = call(calibrate_main, "--checkpoint", model, "--out", tmp_path / "site.pt", folder)
    assert_clean_failure(result, "ranks opposite to the model", "swapped")
    assert not (tmp_path / "site.pt").exists()
