"""The model that ships in models/: what it was trained with, what its card claims, and that the
command lines use it when given no checkpoint."""

import csv
import json
import re
import tomllib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import FULLRES, KERMANY224, ROOT, needs_shared
from pneumo.cli import evaluate_main, export_main, predict_main
from pneumo.core.config import load_config
from pneumo.core.fileio import file_sha256
from pneumo.data.images import decode_all
from pneumo.model import checkpoint as checkpoint_module
from pneumo.model.checkpoint import BUNDLED_MODEL, TrainedModel, bundled_checkpoint
from pneumo.score.export import load_torchscript

MODEL = ROOT / "models" / BUNDLED_MODEL
CARD = ROOT / "models" / "README.md"


def test_bundled_model_is_small_and_was_trained_by_the_shipped_recipe():
    assert bundled_checkpoint() == MODEL
    assert MODEL.stat().st_size <= 10 * 2**20
    # Trained by `pneumo-train --config configs/kermany.yaml`, with nothing overridden.
    assert TrainedModel.load(MODEL).config == load_config(ROOT / "configs" / "kermany.yaml")


def test_packaging_lists_every_package_and_the_model():
    # Packages are listed by hand because models/ is mapped into the wheel as pneumo.weights.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert on_disk | {"pneumo.weights"} == set(setuptools["packages"])
    assert setuptools["package-dir"]["pneumo.weights"] == "models"
    assert "*.pt" in setuptools["package-data"]["pneumo.weights"]


def card_value(row: str) -> float:
    match = re.search(rf"\| {row} \| ([0-9.]+) ", CARD.read_text())
    assert match, f"{row} not in the model card's table"
    return float(match.group(1))


@needs_shared
def test_evaluate_without_checkpoint_reproduces_the_model_card(tmp_path):
    out = tmp_path / "val"
    code = evaluate_main(
        [
            "--split",
            "val",
            "--set",
            f"data.root={KERMANY224}",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--bootstrap",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(MODEL)
    for key, row in (
        ("auc", "ROC AUC"),
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
    ):
        assert metrics[key] == pytest.approx(card_value(row), abs=5e-4), key


@needs_shared
def test_predict_without_checkpoint_scores_real_xrays(tmp_path):
    out = tmp_path / "scores.csv"
    assert predict_main([str(KERMANY224 / "val"), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 16 and {r["model"] for r in rows} == {file_sha256(MODEL)[:16]}
    labels = [int("/PNEUMONIA/" in r["path"]) for r in rows]
    probs = [float(r["probability"]) for r in rows]
    # The 16 official validation images, never used in training or selection (see the model card).
    # With 8 per class, each of the 64 normal-pneumonia pairs moves the AUC by 1/64: the bound says
    # "far better than chance on another grading batch", not a score to tune towards.
    assert roc_auc_score(labels, probs) > 0.85
    assert all(r["label"] == "PNEUMONIA" for r, y in zip(rows, labels, strict=True) if y)


@needs_shared
def test_dct_downscaling_leaves_the_probabilities_where_a_full_decode_puts_them(monkeypatch):
    """The 100 original-size JPEGs scored by the bundled model, decoded as pneumo-predict does (reduced
    in the DCT domain while decoding, then resized by way of Pillow's reduce) and in full, resized by
    bilinear resampling all the way: neither shortcut may move a probability by 0.01."""
    files = [str(f) for f in sorted((FULLRES / "train").glob("*/*.jpeg"))]
    model = TrainedModel.load(MODEL)

    def probabilities():
        images, _ = decode_all(files, model.config.data.image_size, 10**8, skip_bad=False)
        return 1 / (1 + np.exp(-model.logits(images)))

    reduced = probabilities()
    monkeypatch.setattr("pneumo.data.images._draft", lambda im, size: None)  # the full decode, colour as colour
    monkeypatch.setattr("pneumo.data.images.REDUCING_GAP", None)
    full = probabilities()
    assert len(files) == 100 and np.abs(reduced - full).max() < 0.01, np.abs(reduced - full).max()
    labels = np.array(["/PNEUMONIA/" in f for f in files])
    assert ((full >= model.threshold) == labels).mean() > 0.9  # training images: a sanity check, not a score


def test_export_without_checkpoint_exports_the_bundled_model(tmp_path):
    assert export_main(["--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    _, meta = load_torchscript(tmp_path / "m.pt")
    assert meta["threshold"] == TrainedModel.load(MODEL).threshold and meta["checkpoint"] == file_sha256(MODEL)[:16]


def test_a_missing_bundled_model_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint_module, "BUNDLED_MODEL", "missing.pt")
    assert predict_main([str(tmp_path), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "no --checkpoint given" in err and "Traceback" not in err


def front_matter() -> dict:
    import yaml

    text = CARD.read_text()
    assert text.startswith("---\n"), "the model card opens with YAML front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_the_cards_front_matter_equals_the_checkpoints_own_metrics():
    meta = front_matter()
    model = TrainedModel.load(MODEL)
    assert meta["license"] and meta["datasets"] and meta["pneumo"]["model_id"] == model.model_id
    assert meta["pneumo"]["intended_use"] and meta["pipeline_tag"] == "image-classification"
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "validation"
    stated = {m["type"]: m["value"] for m in result["metrics"]}
    assert set(stated) >= {"roc_auc", "accuracy", "sensitivity", "specificity", "f1", "ece"}
    for key, value in stated.items():
        assert value == round(model.val_metrics["auc" if key == "roc_auc" else key], 4), key
    assert meta["pneumo"]["threshold"] == round(model.threshold, 4)


def test_the_bundled_models_logits_are_the_ones_recorded_before_the_redesign():
    """The logits of 24 synthetic X-rays, recorded with the code before the subpackages (commit c9b7d64),
    with the CPU kernels on and off. Equal bit for bit on the machine that recorded them; the bound
    leaves room only for another CPU's kernels rounding differently (float32 logits near 5)."""
    from pneumo.cpu import kernels
    from pneumo.data.synthetic import make_split

    recorded = json.loads((ROOT / "tests" / "model" / "bundled_logits.json").read_text())
    images, _ = make_split("test", 24, 224, 0.5, 7)
    model = TrainedModel.load(MODEL)
    for enabled in (True, False):
        with kernels(enabled):
            logits = model.logits(images)
        assert np.abs(logits - np.array(recorded["logits"])).max() <= 2e-5, enabled
