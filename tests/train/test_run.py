import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import history, tiny_raw
from pneumo.core.config import from_dict, to_dict
from pneumo.core.errors import PneumoError
from pneumo.data.synthetic import write_folder
from pneumo.model.checkpoint import TrainedModel, read_checkpoint
from pneumo.train.run import train, warmup_cosine


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
        "curves.png",
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


def test_learns_the_synthetic_task(learned_run):
    _, best = learned_run
    assert best["val_auc"] > 0.8, best  # chance is 0.5


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


def test_a_second_run_on_the_same_directory_is_refused(tiny_config):
    import fcntl
    import os

    from pneumo.core.errors import OutputLocked

    cfg = tiny_config()
    run = Path(cfg.output.dir)
    run.mkdir(parents=True)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live run holds the directory
    try:
        with pytest.raises(OutputLocked, match="another pneumo-train"):
            train(cfg)
    finally:
        os.close(fd)
    assert not (run / "best.pt").exists()


def test_resume_refuses_when_the_data_changed(tmp_path, tiny_config):
    write_folder(tmp_path / "xray", {"train": 40}, size=32)
    cfg = tiny_config(data={"format": "folder", "root": str(tmp_path / "xray")})
    train(cfg)
    write_folder(tmp_path / "more", {"train": 2}, size=32, seed=7)
    for f in (tmp_path / "more" / "train" / "PNEUMONIA").iterdir():
        f.rename(tmp_path / "xray" / "train" / "PNEUMONIA" / f"person9{f.name[6:]}")
    split_before = (Path(cfg.output.dir) / "split.json").read_text()
    with pytest.raises(PneumoError, match="the data differs from what the run .* was started on"):
        train(tiny_config(data={"format": "folder", "root": str(tmp_path / "xray")}, train={"epochs": 3}), resume=True)
    assert (Path(cfg.output.dir) / "split.json").read_text() == split_before


def test_a_new_run_leaves_none_of_the_old_runs_files(tmp_path, tiny_config):
    write_folder(tmp_path / "xray", {"train": 40}, size=32)
    (tmp_path / "xray" / "train" / "NORMAL" / "IM-7777-0001.jpeg").write_text("not an image")
    skip = tiny_config(data={"format": "folder", "root": str(tmp_path / "xray"), "on_bad_image": "skip"})
    train(skip)
    run = Path(skip.output.dir)
    assert (run / "bad_images.csv").exists()
    (tmp_path / "xray" / "train" / "NORMAL" / "IM-7777-0001.jpeg").unlink()
    train(tiny_config(data={"format": "folder", "root": str(tmp_path / "xray")}))
    assert not (run / "bad_images.csv").exists()
    assert (run / "train.log").read_text().count("epoch 1/2: train loss") == 1  # not appended to the old log


def test_the_handed_over_model_is_calibrated_on_validation(tiny_config):
    from pneumo.evaluate.evaluation import score

    cfg = tiny_config(train={"epochs": 3, "pos_weight": 0.2})  # a weighted loss pulls probabilities down
    best = train(cfg)
    model = TrainedModel.load(Path(cfg.output.dir) / "best.pt")
    assert model.calibration.method == "platt" and model.calibration.scale > 0
    assert best["val_ece"] == pytest.approx(model.val_metrics["ece"]) and best["val_ece"] < 0.1
    assert 0 <= best["val_ece_cross_validated"] < 0.2
    # The stored threshold applies to the calibrated probabilities that every command computes.
    from pneumo.data import load_split
    from pneumo.evaluate.metrics import binary_metrics

    val = load_split(model.config, "val")
    assert binary_metrics(val.labels, score(model, val.images), model.threshold)["accuracy"] == pytest.approx(
        best["val_accuracy"]
    )


def test_an_ensemble_trains_its_members_and_averages_them(tiny_config):
    import torch

    cfg = tiny_config(train={"members": 2, "epochs": 1})
    best = train(cfg)
    run = Path(cfg.output.dir)
    members = [TrainedModel.load(run / "members" / f"seed-{s}" / "best.pt") for s in (0, 1)]
    assert members[0].config.seed == 0 and members[1].config.seed == 1
    model = TrainedModel.load(run / "best.pt")
    assert len(model.members) == 2 and model.epoch == [1, 1] and best["epoch"] == [1, 1]
    x = torch.rand(3, 1, 32, 32)
    raw = [m.network()(x) for m in members]
    raw = [(r - m.calibration.bias) / m.calibration.scale for r, m in zip(raw, members, strict=True)]
    expected = (raw[0] + raw[1]) / 2 * model.calibration.scale + model.calibration.bias
    assert torch.allclose(model.network()(x), expected, atol=1e-5)
    # Resumed with nothing left to do, it hands over the same model.
    assert train(cfg, resume=True)["val_auc"] == best["val_auc"]


def test_curves_are_drawn_every_epoch_and_tensorboard_on_request(tiny_config):
    cfg = tiny_config(output={"tensorboard": True})
    train(cfg)
    run = Path(cfg.output.dir)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_run_can_start_from_a_trained_models_weights(tmp_path, tiny_config, trained_checkpoint):
    source = TrainedModel.load(trained_checkpoint)
    # lr 0: the weights it starts from are the weights it ends with (BatchNorm's statistics still move)
    cfg = tiny_config(train={"epochs": 1, "lr": 0.0, "init_from": str(trained_checkpoint)})
    train(cfg)
    started = TrainedModel.load(Path(cfg.output.dir) / "best.pt").members[0]
    weights = [k for k in started if k.endswith("weight") or k.endswith("bias")]
    assert weights and all(torch.equal(started[k], source.members[0][k]) for k in weights)
    assert TrainedModel.load(Path(cfg.output.dir) / "best.pt").config.train.init_from == str(trained_checkpoint)


def test_a_start_from_another_architecture_is_refused_before_any_work(tmp_path, tiny_config, trained_checkpoint):
    from conftest import assert_clean_failure, call, write_config
    from pneumo.cli import train_main

    raw = to_dict(tiny_config(model={"channels": [4, 8]}))
    config = write_config(tmp_path / "other.yaml", raw)
    result = call(train_main, "--config", config, "--init", trained_checkpoint)
    assert_clean_failure(result, "train.init_from", "channels [8, 16]")
    assert not Path(raw["output"]["dir"]).exists()


def test_compile_under_several_processes_is_refused_before_any_work(tiny_config, monkeypatch):
    from contextlib import contextmanager

    from pneumo.core.distributed import Context
    from pneumo.train import run

    @contextmanager
    def two_processes(device_setting):
        yield Context(rank=0, world=2), torch.device("cpu")

    monkeypatch.setattr(run.distributed, "session", two_processes)
    cfg = tiny_config(train={"compile": True})
    with pytest.raises(PneumoError, match="train.compile works in one process only"):
        train(cfg)
    assert not Path(cfg.output.dir).exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_path_a_gpu_takes_trains_end_to_end_on_the_cpu(tmp_path, precision):
    """What runs on CUDA is torch's modules (the CPU kernels stand aside), in bf16 autocast on a GPU
    that computes in it: the same run here, kernels off, float32 and bf16, through the command line."""
    from conftest import call, write_config
    from pneumo.cli import evaluate_main, train_main

    config = write_config(tmp_path / "gpu-path.yaml", tiny_raw(tmp_path / "run", train={"epochs": 2}))
    result = call(train_main, "--config", config, "--set", "cpu_kernels=false", "--set", f"train.precision={precision}")
    assert result.returncode == 0, result.stderr
    rows = history(tmp_path / "run")
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert call(evaluate_main, "--checkpoint", tmp_path / "run" / "best.pt", "--out", tmp_path / "e").returncode == 0
