"""The command lines as a user and a cron job meet them: real processes, exit codes, files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    KERMANY224,
    ROOT,
    assert_clean_failure,
    call,
    history,
    make_images,
    needs_shared,
    run_script,
    tiny_raw,
    write_config,
)
from pneumo.cli import evaluate_main, train_main
from pneumo.model.checkpoint import TrainedModel, read_checkpoint

run = run_script


def test_console_scripts_are_installed():
    bindir = Path(sys.executable).parent
    for name in ("pneumo-train", "pneumo-evaluate"):
        assert (bindir / name).exists(), f"{name} not installed beside {sys.executable}"


def test_killed_run_resumes_exactly(tmp_path):
    """Train, SIGKILL part way, --resume: the epochs equal those of a run that was never killed."""
    raw = tiny_raw(
        tmp_path / "killed",
        data={"image_size": 48, "synthetic": {"n_train": 480, "n_val": 64, "n_test": 64}},
        train={"epochs": 4},
    )
    cfg = write_config(tmp_path / "exp.yaml", raw)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg)],
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    jsonl = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and not (jsonl.exists() and jsonl.read_text().count("\n") >= 1):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = read_checkpoint(tmp_path / "killed" / "last.pt")["epoch"]
    assert 1 <= done < 4, "the run must be killed part way for this test to mean anything"

    resumed = run("train.py", "--config", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'killed'} after epoch {done}" in resumed.stderr
    fresh = run("train.py", "--config", str(cfg), "--set", f"output.dir={tmp_path / 'fresh'}")
    assert fresh.returncode == 0, fresh.stderr
    assert history(tmp_path / "killed") == history(tmp_path / "fresh")
    assert [r["epoch"] for r in history(tmp_path / "fresh")] == [1, 2, 3, 4]
    assert not list((tmp_path / "killed").glob(".*.tmp"))


def test_train_then_evaluate(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", tiny_raw(tmp_path / "run"))
    trained = run("train.py", "--config", str(cfg), "--set", "train.epochs=1", "--set", "seed=3")
    assert trained.returncode == 0, trained.stderr
    assert "best epoch 1" in trained.stderr

    out = tmp_path / "eval"
    result = run("evaluate.py", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "auc",
        "f1",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "threshold",
        "n",
        "confusion_matrix",
    ):
        assert key in metrics
    assert metrics["n"] == 48 and metrics["split"] == "test"
    assert sum(map(sum, metrics["confusion_matrix"])) == 48
    assert metrics["threshold"] == TrainedModel.load(tmp_path / "run" / "best.pt").threshold
    assert f"ROC AUC       {metrics['auc']:.4f}" in result.stdout
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "id,label,probability,prediction" and len(rows) == 49

    # The validation split is the one the threshold was chosen on: evaluate reproduces training's figures.
    val = call(
        evaluate_main,
        "--checkpoint",
        str(tmp_path / "run" / "best.pt"),
        "--split",
        "val",
        "--out",
        str(tmp_path / "val"),
    )
    assert val.returncode == 0, val.stderr
    best = TrainedModel.load(tmp_path / "run" / "best.pt").val_metrics
    got = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert got["auc"] == pytest.approx(best["auc"]) and got["f1"] == pytest.approx(best["f1"])


@pytest.mark.parametrize(
    "config_text, overrides, phrases",
    [
        ("train:\n  epochz: 3\n", [], ["exp.yaml", "unknown key 'train.epochz'"]),
        ("train:\n  epochs: -3\n", [], ["exp.yaml", "train.epochs"]),
        ("seed: 1\n", ["train.batch_size=zero"], ["--set train.batch_size=zero", "train.batch_size"]),
        ("data:\n  format: folder\n  root: /no/such/folder\n", [], ["data folder /no/such/folder does not exist"]),
    ],
)
def test_bad_configs_fail_cleanly(tmp_path, config_text, overrides, phrases):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(config_text + f"output:\n  dir: {tmp_path / 'run'}\n")
    result = call(train_main, "--config", str(cfg), *[a for o in overrides for a in ("--set", o)])
    assert_clean_failure(result, *phrases)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_config_and_resume_fail_cleanly(tmp_path):
    assert_clean_failure(call(train_main, "--config", str(tmp_path / "nope.yaml")), "nope.yaml does not exist")
    cfg = write_config(tmp_path / "exp.yaml", tiny_raw(tmp_path / "run"))
    assert_clean_failure(call(train_main, "--config", str(cfg), "--resume"), "nothing to resume")


def test_bad_checkpoints_fail_cleanly(tmp_path):
    out = str(tmp_path / "eval")
    # A checkpoint that cannot be used has its own exit code, the same for every command.
    assert_clean_failure(
        call(evaluate_main, "--checkpoint", str(tmp_path / "none.pt"), "--out", out), "none.pt does not exist", code=3
    )
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    assert_clean_failure(
        call(evaluate_main, "--checkpoint", str(tmp_path / "junk.pt"), "--out", out),
        "not a readable checkpoint",
        code=3,
    )
    assert not (tmp_path / "eval").exists()


@needs_shared
def test_missing_split_and_one_class_fail_cleanly(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", tiny_raw(tmp_path / "run", data={"format": "synthetic"}))
    assert call(train_main, "--config", str(cfg), "--set", "train.epochs=1").returncode == 0
    ckpt = str(tmp_path / "run" / "best.pt")
    # The real data ships without its test split.
    result = call(
        evaluate_main,
        "--checkpoint",
        ckpt,
        "--set",
        "data.format=folder",
        "--set",
        f"data.root={KERMANY224}",
        "--out",
        str(tmp_path / "e"),
    )
    assert_clean_failure(result, "split 'test' not found")
    one_class = tmp_path / "one" / "test"
    (one_class / "NORMAL").mkdir(parents=True)
    (one_class / "PNEUMONIA").mkdir()
    for f in sorted((KERMANY224 / "val" / "PNEUMONIA").iterdir())[:3]:
        (one_class / "PNEUMONIA" / f.name).write_bytes(f.read_bytes())
    evaluate_one = ("--checkpoint", ckpt, "--set", "data.format=folder", "--set", f"data.root={tmp_path / 'one'}")
    assert_clean_failure(call(evaluate_main, *evaluate_one, "--out", tmp_path / "e"), "holds only PNEUMONIA images")
    (one_class / "PNEUMONIA").rename(tmp_path / "moved")
    (one_class / "PNEUMONIA").mkdir()
    assert_clean_failure(call(evaluate_main, *evaluate_one, "--out", tmp_path / "e"), "holds no images")
    assert not (tmp_path / "e").exists()


def test_bad_config_is_reported_before_torch_is_imported(tmp_path):
    (tmp_path / "exp.yaml").write_text("train:\n  epochz: 3\n")
    assert_clean_failure(run("train.py", "--config", str(tmp_path / "exp.yaml")), "unknown key 'train.epochz'")
    # torch takes seconds to import: a nightly job with a typo fails before paying for it.
    code = (
        "import sys; from pneumo.cli import train_main; code = train_main(['--config', sys.argv[1]]); "
        "sys.exit(10 if 'torch' in sys.modules else code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "exp.yaml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr


def test_argument_errors_exit_2():
    result = run("evaluate.py", "--checkpoint", "x.pt")
    assert result.returncode == 2 and "--out" in result.stderr


@pytest.mark.parametrize(
    "script, args, phrase",
    [
        ("predict.py", ["--out", "s.csv", "--shard", "²/3", "."], "--shard ²/3"),
        ("predict.py", ["--out", "s.csv", "--shard", "1/" + "9" * 5000, "."], "expected K/N"),
        ("predict.py", ["--out", "s.csv", "--fail-on-ood", "2", "."], "a share from 0 to 1"),
        ("predict.py", ["--out", "s.csv", "--batch-size", "0", "."], "from 1 to 4096"),
        ("evaluate.py", ["--out", "e", "--bootstrap", "-1"], "argument --bootstrap"),
        ("evaluate.py", ["--out", "e", "--seed", "-1"], "argument --seed"),
        ("calibrate.py", ["--out", "x.pt", "--seed", "-1", "."], "argument --seed"),
        ("calibrate.py", ["--out", "x.pt", "--folds", "1", "."], "argument --folds"),
        ("export.py", ["--format", "onnx", "--out", "."], "is a folder"),
        ("predict.py", ["--out", "/dev/null", "."], "not a regular file"),
    ],
)
def test_options_out_of_range_are_one_sentence_and_exit_2(tmp_path, script, args, phrase):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and phrase in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()[-1]) < 300  # one sentence, not the 5000 digits it was given


def test_output_onto_standard_output_is_refused_and_a_reader_that_left_is_no_failure(tmp_path):
    images = make_images(tmp_path / "imgs", 2)
    predict = [sys.executable, str(ROOT / "scripts" / "predict.py")]
    with open(tmp_path / "o.txt", "w") as stdout:
        result = subprocess.run(
            [*predict, "--out", "/dev/stdout", str(images[0])], stdout=stdout, stderr=subprocess.PIPE
        )
    assert result.returncode == 2 and b"the standard output too" in result.stderr
    # `| true`: the reader has gone before the summary is printed; the scores are written all the same.
    pipe = subprocess.Popen(
        [*predict, "--out", str(tmp_path / "s.csv"), str(tmp_path / "imgs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    pipe.stdout.close()
    assert pipe.wait() == 0 and b"Traceback" not in pipe.stderr.read()
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 3


def test_evaluation_report(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", tiny_raw(tmp_path / "run", data={"image_size": 48}, train={"epochs": 1}))
    assert call(train_main, "--config", str(cfg)).returncode == 0
    out = tmp_path / "eval"
    result = call(
        evaluate_main,
        "--checkpoint",
        str(tmp_path / "run" / "best.pt"),
        "--out",
        str(out),
        "--bootstrap",
        "200",
        "--explain",
        "2",
        "--explain-file",
        str(tmp_path / "x.png"),
    )
    assert result.returncode == 2 and "x.png: file not found" in result.stderr  # a named file must exist
    result = call(
        evaluate_main,
        "--checkpoint",
        str(tmp_path / "run" / "best.pt"),
        "--out",
        str(out),
        "--bootstrap",
        "200",
        "--explain",
        "2",
    )
    assert result.returncode == 0, result.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["ci95"]) == {"auc", "accuracy", "sensitivity", "specificity", "f1"} and m["bootstrap_resamples"] == 200
    lo, hi = m["ci95"]["auc"]
    assert lo <= m["auc"] <= hi
    assert 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 1
    assert [p["name"] for p in m["operating_points"]][:2] == ["stored threshold", "sensitivity>=0.90"]
    for png in ("roc.png", "pr.png", "confusion.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert (
        "| ROC AUC |" in report and "95% CI" in report and "![roc](roc.png)" in report and "sensitivity>=0.95" in report
    )
    assert len(m["explanations"]) == 2 and all((out / e["file"]).exists() for e in m["explanations"])
    assert m["explanations"][0]["file"] in report


def test_one_entry_point_with_every_command():
    result = subprocess.run([sys.executable, "-m", "pneumo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("train", "evaluate", "predict", "export", "calibrate", "download"):
        assert command in result.stdout
    version = subprocess.run([sys.executable, "-m", "pneumo", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("pneumo 0.") and "torch" in version.stdout
    helped = subprocess.run([sys.executable, "-m", "pneumo", "predict", "--help"], capture_output=True, text=True)
    assert "--shard K/N" in helped.stdout and "(default: 32)" in helped.stdout  # options with their defaults


def test_print_config_shows_the_resolved_yaml_and_does_nothing_else(tmp_path):
    result = call(
        train_main, "--config", ROOT / "configs" / "quickstart.yaml", "--set", "train.epochs=2", "--print-config"
    )
    assert result.returncode == 0
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["epochs"] == 2 and printed["output"]["dir"] == "runs/quickstart"
    assert not (ROOT / "runs" / "quickstart" / ".printed").exists()


def test_sigterm_stops_a_run_cleanly(tmp_path):
    raw = tiny_raw(tmp_path / "run", data={"image_size": 48, "synthetic": {"n_train": 480}}, train={"epochs": 50})
    cfg = write_config(tmp_path / "exp.yaml", raw)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg)],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 90
    while time.time() < deadline and not (tmp_path / "run" / "last.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob(".*.tmp"))  # nothing half-written
