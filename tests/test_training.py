import json
from pathlib import Path

import numpy as np
import pytest

from conftest import history
from pneumo.checkpoint import TrainedModel, read_checkpoint
from pneumo.config import from_dict, to_dict
from pneumo.data.synthetic import write_folder
from pneumo.errors import PneumoError
from pneumo.training import train, warmup_cosine


def test_run_directory_holds_everything(tiny_config):
    cfg = tiny_config()
    best = train(cfg)
    run = Path(cfg.output.dir)
    assert {p.name for p in run.iterdir() if not p.name.startswith(".")} == {
        "config.yaml",
        "split.json",
        "metrics.jsonl",
        "train.log",
        "best.pt",
        "last.pt",
    }
    records = history(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {
        "train_loss",
        "val_loss",
        "val_auc",
        "val_f1",
        "val_accuracy",
        "val_sensitivity",
        "val_specificity",
        "val_threshold",
        "lr",
    } <= set(records[0])
    model = TrainedModel.load(run / "best.pt")
    assert model.threshold == best["val_threshold"] and model.epoch == best["epoch"]
    assert model.config.train.epochs == 2  # the resolved config travels with the weights
    assert all(t.device.type == "cpu" for t in model.members[0].values())
    assert model.provenance["config_sha256"] and model.provenance["torch"]
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 96 and len(split["val"]) == 48
    assert "epoch 2/2" in (run / "train.log").read_text()


def test_learns_the_synthetic_task(tiny_config):
    cfg = tiny_config(
        data={"image_size": 64, "synthetic": {"n_train": 600, "n_val": 200, "n_test": 16}},
        model={"channels": [16, 32, 64], "stem_stride": 1},
        train={"epochs": 6, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5},
    )
    best = train(cfg)
    assert best["val_auc"] > 0.8, best  # 0.896 when written; chance is 0.5


def test_same_seed_same_metrics(tmp_path, tiny_config):
    a = tiny_config()
    b = from_dict({**to_dict(a), "output": {"dir": str(tmp_path / "other")}})
    train(a)
    train(b)
    assert history(Path(a.output.dir)) == history(tmp_path / "other")


def test_early_stopping(tiny_config):
    cfg = tiny_config(train={"epochs": 20, "patience": 2})
    train(cfg)
    run = Path(cfg.output.dir)
    aucs = [r["val_auc"] for r in history(run)]
    assert len(aucs) < 20
    # Stopped after the second epoch in a row without a new best (ties are no improvement).
    best_at = int(np.argmax(aucs))
    assert len(aucs) == best_at + 1 + 2
    assert read_checkpoint(run / "last.pt")["training"]["state"]["stopped_early"]


def test_resume_refuses_other_settings_and_missing_runs(tiny_config):
    with pytest.raises(PneumoError, match="nothing to resume"):
        train(tiny_config(), resume=True)
    train(tiny_config())
    with pytest.raises(PneumoError, match="differs from the run being resumed .* at: train.lr"):
        train(tiny_config(train={"lr": 0.1}), resume=True)
    # More epochs is a legitimate change: the run goes on from where it stopped.
    best = train(tiny_config(train={"epochs": 3}), resume=True)
    records = history(Path(tiny_config().output.dir))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # The best epoch is chosen over the whole run, the epochs before the resume included.
    assert best["epoch"] == records[int(np.argmax([r["val_auc"] for r in records]))]["epoch"]
    assert TrainedModel.load(Path(tiny_config().output.dir) / "best.pt").epoch == best["epoch"]


def test_pos_weight_auto(tiny_config):
    cfg = tiny_config(data={"synthetic": {"prevalence": 0.75}}, train={"epochs": 1, "pos_weight": "auto"})
    train(cfg)
    run = Path(cfg.output.dir)
    labels = np.array([r["label"] for r in json.loads((run / "split.json").read_text())["train"]])
    expected = (labels == 0).sum() / (labels == 1).sum()
    assert expected < 0.6
    assert f"pos_weight {expected}" in (run / "train.log").read_text()


def test_folder_source_carves_validation_by_patient(tmp_path, tiny_config):
    write_folder(tmp_path / "xray", {"train": 80, "test": 20}, size=32)
    cfg = tiny_config(
        data={"format": "folder", "root": str(tmp_path / "xray"), "val_fraction": 0.25}, train={"epochs": 1}
    )
    train(cfg)
    split = json.loads((Path(cfg.output.dir) / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 80
    assert not {r["patient"] for r in split["train"]} & {r["patient"] for r in split["val"]}
    assert all(r["id"].startswith(str(tmp_path / "xray" / "train")) for r in split["val"])


def test_one_class_validation_stops_before_training(tmp_path, tiny_config):
    write_folder(tmp_path / "xray", {"train": 40}, size=32)
    for f in (tmp_path / "xray" / "train" / "NORMAL").iterdir():
        f.rename(tmp_path / "xray" / "train" / "PNEUMONIA" / f.name)
    cfg = tiny_config(data={"format": "folder", "root": str(tmp_path / "xray")})
    with pytest.raises(PneumoError, match="split 'train' holds only PNEUMONIA images"):
        train(cfg)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_warmup_then_cosine():
    f = warmup_cosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_bad_images_are_skipped_and_listed_or_stop_the_run(tmp_path, tiny_config):
    write_folder(tmp_path / "xray", {"train": 40}, size=32)
    (tmp_path / "xray" / "train" / "NORMAL" / "IM-7777-0001.jpeg").write_text("not an image")
    cfg = tiny_config(
        data={"format": "folder", "root": str(tmp_path / "xray"), "on_bad_image": "skip"}, train={"epochs": 1}
    )
    train(cfg)
    report = (Path(cfg.output.dir) / "bad_images.csv").read_text().splitlines()
    assert report[0] == "split,path,reason" and len(report) == 2 and "IM-7777-0001.jpeg" in report[1]
    with pytest.raises(PneumoError, match="cannot use image .*IM-7777-0001.jpeg: cannot identify image file"):
        train(
            tiny_config(
                data={"format": "folder", "root": str(tmp_path / "xray")}, output={"dir": str(tmp_path / "run2")}
            )
        )
    assert not (tmp_path / "run2").exists()  # stopped before anything was written
