"""pneumo-predict as cron runs it: real processes, kills, re-runs, locks, exit codes."""

import csv
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_images, run_script
from pneumo.cli import predict_main
from pneumo.score import predict as predict_module
from pneumo.score.predict import COLUMNS, InferenceModel, decoded_batches, find_images, unescape_path


@pytest.fixture
def checkpoint(trained_checkpoint):
    return trained_checkpoint


def read(out: Path) -> list[dict]:
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def predict_cli(*args):
    return run_script("predict.py", *args)


def test_scores_folders_files_and_csv_lists(tmp_path, checkpoint):
    paths = make_images(tmp_path / "imgs", 6)
    (tmp_path / "list.csv").write_text("path\n" + f"imgs/{paths[0].parent.name}/{paths[0].name}\n")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    hidden = paths[0].parent / f"._{paths[0].name}"  # the resource fork macOS leaves beside a copied file
    hidden.write_bytes(b"\0\5\26\7")
    assert len(find_images([str(tmp_path / "imgs"), str(paths[1]), str(tmp_path / "list.csv")])) == 6
    assert str(hidden.resolve()) in find_images([str(hidden)])  # named on purpose: kept, and its row says why
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "imgs")]) == 0
    rows = read(out)
    assert list(rows[0]) == COLUMNS and len(rows) == 6
    assert {r["path"] for r in rows} == {str(p.resolve()) for p in paths}
    for r in rows:
        p = float(r["probability"])
        assert 0 < p < 1 and r["error"] == "" and len(r["model"]) == 16
        assert r["label"] in ("NORMAL", "PNEUMONIA")


def test_rerun_skips_and_bad_files_are_listed(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.jpeg").write_text("not an image")
    out = tmp_path / "scores.csv"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "imgs")]
    assert predict_main(args) == 4  # finished, but one file could not be scored
    bad = [r for r in read(out) if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken.jpeg") and "cannot identify" in bad[0]["error"]
    make_images(tmp_path / "imgs" / "new", 2)
    assert predict_main(args) == 4  # the two new files scored; the broken one was tried again
    rows = read(out)
    assert len(rows) == 8 and len({r["path"] for r in rows}) == 7
    assert sum(r["path"].endswith("broken.jpeg") for r in rows) == 2
    # Its copy completes: the next run scores it, and its last row, its result, is a score.
    (tmp_path / "imgs" / "broken.jpeg").write_bytes((tmp_path / "imgs" / "new" / "b" / "img0000.png").read_bytes())
    result = predict_cli(*args)
    assert result.returncode == 0 and "1 scored" in result.stdout and "1 of these again" in result.stdout
    rows = read(out)
    assert len(rows) == 9 and rows[-1]["path"].endswith("broken.jpeg") and rows[-1]["probability"]


def test_a_file_scored_by_another_model_is_scored_again(tmp_path, checkpoint, learned_run):
    """The README's steps: score, calibrate, score into the same file with the new model. A file's last
    row is its result, so every file gets the new model's row; a third run has nothing to do."""
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "imgs")]) == 0
    again = ["--checkpoint", str(learned_run[0]), "--out", str(out), str(tmp_path / "imgs")]
    result = predict_cli(*again)
    assert result.returncode == 0 and "3 scored" in result.stdout and "3 of these again" in result.stdout
    rows = read(out)
    assert len(rows) == 6 and len({r["model"] for r in rows[:3]}) == 1 and rows[3]["model"] != rows[0]["model"]
    assert "0 scored" in predict_cli(*again).stdout and len(read(out)) == 6


def test_killed_run_resumes_with_each_file_once(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 300, size=64)
    out = tmp_path / "scores.csv"
    args = ["--checkpoint", checkpoint, "--out", out, "--batch-size", "8", tmp_path / "imgs"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), *map(str, args)],
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 40):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n") - 1
    assert 0 < written < 300, "the run must be killed part way for this test to mean anything"
    # Simulate the worst moment for a kill: half a line written.
    with open(out, "a") as f:
        f.write("/half/a/line.png,0.12")
    result = predict_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "incomplete row" in result.stderr
    rows = read(out)
    assert len(rows) == 300 and len({r["path"] for r in rows}) == 300
    assert all(r["probability"] and not r["error"] for r in rows)
    flagged = r"( \(\d+ out of the model's scope\))?"
    assert re.search(rf"300 files: {300 - written} scored{flagged}, 0 unusable, {written} already in", result.stdout)


def test_lock_stops_a_second_writer_and_stale_locks_are_taken_over(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "scores.csv"
    lock = tmp_path / "scores.csv.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another live run holds it
    os.write(fd, b"4242\n")
    result = predict_cli("--checkpoint", checkpoint, "--out", out, tmp_path / "imgs")
    assert result.returncode == 5 and "another pneumo-predict (pid 4242) is writing " + str(out) in result.stderr
    os.close(fd)  # the holder dies: its lock goes with it, the file stays behind
    assert lock.exists()
    result = predict_cli(
        "--checkpoint", checkpoint, "--out", out, "--log-file", tmp_path / "job.log", tmp_path / "imgs"
    )
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "job.log").read_text()
    summary = r"2 files: 2 scored( \(\d out of the model's scope\))?, 0 unusable"
    assert "2 to score with model" in log and re.search(summary, log) and re.search(summary, result.stdout)


def test_exit_codes_for_bad_arguments_and_checkpoints(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 1)
    (tmp_path / "junk.pt").write_bytes(os.urandom(100))
    assert (
        predict_cli("--checkpoint", tmp_path / "junk.pt", "--out", tmp_path / "o.csv", tmp_path / "imgs").returncode
        == 3
    )
    result = predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "o.csv", tmp_path / "missing")
    assert result.returncode == 2 and "input" in result.stderr and "does not exist" in result.stderr
    assert predict_cli("--checkpoint", checkpoint, tmp_path / "imgs").returncode == 2  # no --out
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    result = predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "other.csv", tmp_path / "imgs")
    assert result.returncode == 2 and "is not a pneumo-predict output" in result.stderr
    assert "Traceback" not in result.stderr


def odd_names(folder: Path) -> list[bytes]:
    """Images whose names hold a line feed, a carriage return, a quote, a comma and a byte that is not UTF-8."""
    make_images(folder, 1)
    (good,) = folder.rglob("*.png")
    names = [b"new\nline.png", b"carriage\rreturn.png", b'quote",comma.png', b"bad\xff.png"]
    for name in names:
        with open(os.fsencode(folder) + b"/" + name, "wb") as f:
            f.write(good.read_bytes())
    return names


def test_odd_file_names_round_trip_through_the_csv(tmp_path, checkpoint):
    names = odd_names(tmp_path / "imgs")
    out = tmp_path / "scores.csv"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "imgs")]
    assert predict_main(args) == 0
    rows = read(out)
    assert len(rows) == 5 and all(r["probability"] for r in rows)
    out.read_bytes().decode("utf-8")  # valid UTF-8 throughout: undecodable bytes are escaped, reversibly
    assert {os.fsencode(unescape_path(r["path"])).rsplit(b"/", 1)[1] for r in rows} >= set(names)
    assert any(r["path"].endswith("bad\\xff.png") for r in rows)
    # Cut the file right after the line feed inside the first quoted path, as a kill could.
    data = out.read_bytes()
    header_end = data.index(b"\n") + 1
    out.write_bytes(data[: data.index(b"new\n", header_end) + 4])
    result = predict_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "incomplete row" in result.stderr
    rows = read(out)
    assert len(rows) == 5 and len({r["path"] for r in rows}) == 5  # every file once, none scored twice
    assert predict_main(args) == 0 and len(read(out)) == 5  # and a third run reads its own output


def test_a_fifo_in_an_input_list_is_a_row_not_a_hang(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 2)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "list.csv").write_bytes(b"path,label\npipe.png\nimgs/a/img0001.png,x\n,\n\xff\xfe.png\n")
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "list.csv")]) == 4
    errors = {Path(unescape_path(r["path"])).name: r["error"] for r in read(out)}
    assert "not a regular file" in errors["pipe.png"] and errors["img0001.png"] == ""
    assert "file not found" in errors["\udcff\udcfe.png"]


def test_a_symlink_loop_in_an_input_list_is_a_row(tmp_path, checkpoint):
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    (tmp_path / "list.csv").write_text("path\nloop.png\n")
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "list.csv")]) == 4
    (row,) = read(out)
    assert row["path"].endswith("loop.png") and "symbolic links" in row["error"]


def test_what_a_folder_holds_that_cannot_be_read_gets_rows_and_the_rest_is_scored(tmp_path, checkpoint):
    """A subfolder deeper than the system's path limit, a FIFO and a link loop named like images: each
    its own row saying why, never a stopped job or files silently left out."""
    make_images(tmp_path / "imgs", 2)
    deep = os.open(tmp_path / "imgs", os.O_RDONLY)
    for _ in range(os.pathconf(tmp_path, "PC_PATH_MAX") // 200 + 1):  # mkdir relative to a descriptor
        os.mkdir("d" * 200, dir_fd=deep)
        deep, parent = os.open("d" * 200, os.O_RDONLY, dir_fd=deep), deep
        os.close(parent)
    os.close(deep)
    os.mkfifo(tmp_path / "imgs" / "pipe.png")
    os.symlink("loop.jpeg", tmp_path / "imgs" / "loop.jpeg")
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "imgs")]) == 4
    errors = {Path(r["path"]).name[:8]: r["error"] for r in read(out)}
    assert errors["img0000."] == errors["img0001."] == "" and errors["dddddddd"] == "File name too long"
    assert "not a regular file" in errors["pipe.png"] and "symbolic links" in errors["loop.jpe"]


def test_a_symlink_to_the_output_meets_the_same_lock(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "scores.csv"
    out.write_bytes(b"")
    (tmp_path / "alias.csv").symlink_to(out)
    fd = os.open(tmp_path / "scores.csv.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run writing scores.csv
    try:
        result = predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "alias.csv", tmp_path / "imgs")
        assert result.returncode == 5 and f"is writing {out}" in result.stderr
    finally:
        os.close(fd)


def test_shards_split_the_inputs_without_overlap(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 30)
    outs = [tmp_path / f"shard-{k}.csv" for k in (1, 2, 3)]
    for k, out in enumerate(outs, 1):
        args = ["--checkpoint", str(checkpoint), "--out", str(out), "--shard", f"{k}/3", str(tmp_path / "imgs")]
        assert predict_main(args) == 0
    paths = [[r["path"] for r in read(out)] for out in outs]
    assert sorted(sum(paths, [])) == sorted(str(p.resolve()) for p in (tmp_path / "imgs").rglob("*.png"))
    assert all(paths), [len(p) for p in paths]  # every share gets some of the 30 files
    # The same share on another machine, where the folder is mounted elsewhere.
    (tmp_path / "elsewhere").symlink_to(tmp_path / "imgs")
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(tmp_path / "imgs", moved)
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "again.csv"), "--shard", "2/3", str(moved)]
    assert predict_main(args) == 0
    assert sorted(Path(r["path"]).name for r in read(tmp_path / "again.csv")) == sorted(Path(p).name for p in paths[1])
    assert (
        predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "x.csv", "--shard", "4/3", tmp_path).returncode == 2
    )


def test_rows_record_what_made_them(tmp_path, checkpoint):
    import torch

    from pneumo import __version__
    from pneumo.core.config import config_hash
    from pneumo.model.checkpoint import TrainedModel

    make_images(tmp_path / "imgs", 1)
    assert (
        predict_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.csv"), str(tmp_path / "imgs")]) == 0
    )
    (row,) = read(tmp_path / "s.csv")
    assert (row["pneumo"], row["torch"]) == (__version__, str(torch.__version__))
    assert row["config"] == config_hash(TrainedModel.load(checkpoint).config)


def test_an_unwritable_log_file_is_one_sentence(tmp_path, checkpoint):
    make_images(tmp_path / "imgs", 1)
    result = predict_cli(
        "--checkpoint",
        checkpoint,
        "--out",
        tmp_path / "s.csv",
        "--log-file",
        tmp_path / "no" / "x.log",
        tmp_path / "imgs",
    )
    assert result.returncode == 2 and "--log-file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.csv").exists()


def test_a_log_file_refused_as_an_input_is_not_written_even_with_the_error(tmp_path, checkpoint):
    (image,) = make_images(tmp_path / "imgs", 1)
    before = image.read_bytes()
    code = predict_main(["--checkpoint", str(checkpoint), "--out", str(image), "--log-file", str(image), str(image)])
    assert code == 2 and image.read_bytes() == before


def test_non_finite_probabilities_are_errors_not_labels(tmp_path, checkpoint, monkeypatch):
    make_images(tmp_path / "imgs", 2)
    logits = np.array([np.nan, np.log(0.4 / 0.6)])  # the probabilities nan and 0.4
    monkeypatch.setattr("pneumo.score.predict.scored", lambda *a, **k: (logits, np.zeros(2)))
    assert (
        predict_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.csv"), str(tmp_path / "imgs")]) == 4
    )
    rows = read(tmp_path / "s.csv")
    assert [r["label"] for r in rows] == ["", "NORMAL"] and "no finite probability" in rows[0]["error"]


def test_progress_moves_with_the_batches_scored(tmp_path, checkpoint, monkeypatch):
    """The progress bar (or log line) counts a batch when it is handed over to be scored, not earlier."""
    paths = [str(p) for p in make_images(tmp_path / "imgs", 6)]
    pulled = []

    def recording(items, total, desc, unit="it"):
        for item in items:
            pulled.append(len(item))
            yield item

    monkeypatch.setattr(predict_module, "progress", recording)
    seen = []
    for part, (images, errors) in decoded_batches(paths, 2, InferenceModel.load(checkpoint)):
        seen.append(len(pulled))
        assert len(images) == len(part) and not errors
    assert seen == [1, 2, 3] and pulled == [2, 2, 2]


def test_the_model_is_made_ready_only_when_there_is_something_to_score(tmp_path, checkpoint, monkeypatch, capsys):
    """Getting the model ready (on a CPU, loading the kernels) is start-up: reported on its own, kept out of
    the rate, and skipped by a re-run with nothing new."""
    make_images(tmp_path / "imgs", 3)
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.csv"), str(tmp_path / "imgs")]
    made_ready = []
    ready = predict_module._Scorer.ready
    monkeypatch.setattr(predict_module._Scorer, "ready", lambda *a: made_ready.append(1) or ready(*a))
    assert predict_main(args) == 0 and made_ready == [1]
    assert "3 scored" in capsys.readouterr().out.splitlines()[-1]
    assert predict_main(args) == 0 and made_ready == [1]
    assert capsys.readouterr().out.splitlines()[-1].endswith("(0.0 images/s), model ready in 0.0 s")


def noise_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"noise{i}.png")


def test_each_row_says_whether_the_file_is_in_the_models_scope(tmp_path, checkpoint):
    make_images(tmp_path / "xrays", 6, size=32)
    noise_images(tmp_path / "noise", 4)
    out = tmp_path / "scores.csv"
    result = predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path)])
    assert result == 0
    rows = read(out)
    assert all(float(r["ood_score"]) >= 0 for r in rows)
    noise = [r["ood"] for r in rows if "/noise/" in r["path"]]
    xrays = [r["ood"] for r in rows if "/xrays/" in r["path"]]
    assert noise == ["1"] * 4 and xrays.count("0") >= 4  # the model's own kind of image: mostly in scope


def test_a_job_of_mostly_unfamiliar_images_warns_and_can_fail(tmp_path, checkpoint):
    noise_images(tmp_path / "noise", 4)
    result = predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "a.csv", "--fail-on-ood", "0.5", tmp_path)
    assert result.returncode == 6, result.stderr
    assert "4 scored (4 out of the model's scope)" in result.stdout and "Warning: 100% of the files" in result.stdout
    assert len(read(tmp_path / "a.csv")) == 4  # the scores are kept: the job decides what to do with them
    result = predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "b.csv", "--fail-on-ood", "1", tmp_path)
    assert result.returncode == 0
    bad = predict_cli("--checkpoint", checkpoint, "--out", tmp_path / "c.csv", "--fail-on-ood", "1.5", tmp_path)
    assert bad.returncode == 2 and "a share from 0 to 1" in bad.stderr and not (tmp_path / "c.csv").exists()


def test_a_model_without_the_check_leaves_its_columns_empty(tmp_path, checkpoint):
    from pneumo.model.checkpoint import read_checkpoint, save_checkpoint

    raw = read_checkpoint(checkpoint)
    older = {k: v for k, v in raw.items() if k not in ("format", "weights_sha256", "applicability")}
    save_checkpoint(tmp_path / "older.pt", older)
    make_images(tmp_path / "xrays", 2, size=32)
    out = tmp_path / "s.csv"
    assert predict_main(["--checkpoint", str(tmp_path / "older.pt"), "--out", str(out), str(tmp_path / "xrays")]) == 0
    assert all(r["probability"] and r["ood_score"] == "" and r["ood"] == "" for r in read(out))
    result = predict_cli(
        "--checkpoint", tmp_path / "older.pt", "--out", tmp_path / "t.csv", "--fail-on-ood", "0.5", tmp_path / "xrays"
    )
    assert result.returncode == 2 and "no applicability check" in result.stderr


def test_an_edited_row_is_never_repaired_away_with_the_rows_after_it(tmp_path, checkpoint):
    """Only a half-written last row is cut off on the next run. A row someone edited (`,reviewed`
    added) with rows after it is no kill's leftover: one sentence, exit 2, the file byte for byte."""
    make_images(tmp_path / "imgs", 8, size=32)
    out = tmp_path / "scores.csv"
    assert predict_main(["--checkpoint", str(checkpoint), "--out", str(out), str(tmp_path / "imgs")]) == 0
    lines = out.read_bytes().split(b"\n")
    lines[3] += b",reviewed"
    out.write_bytes(b"\n".join(lines))
    before = out.read_bytes()
    (tmp_path / "imgs" / "b" / "new.png").write_bytes((tmp_path / "imgs" / "b" / "img0000.png").read_bytes())
    result = predict_cli("--checkpoint", checkpoint, "--out", out, tmp_path / "imgs")
    assert result.returncode == 2 and "line 4 is not as pneumo-predict writes rows" in result.stderr
    assert "Traceback" not in result.stderr and out.read_bytes() == before
