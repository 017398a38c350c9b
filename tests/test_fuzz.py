"""Property-based tests over what users, admins and attackers feed the command lines: config values,
file names and image bytes. Whatever comes in: an exit code from the documented set, no traceback,
an output CSV that parses, and no file scored twice."""

import contextlib
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT
from pneumo.cli import predict_main, train_main
from pneumo.data.synthetic import make_split
from pneumo.score.predict import COLUMNS, unescape_path

KEYS = [
    "seed",
    "device",
    "data.format",
    "data.root",
    "data.image_size",
    "data.max_pixels",
    "data.synthetic.n_train",
    "augment.noise",
    "augment.rotate_deg",
    "model.channels",
    "model.tta",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.threshold",
    "train.members",
    "train.calibration",
    "output.dir",
    "nonsense.key",
    "train",
]
VALUES = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=30),
    st.sampled_from(
        ["[16,32", "*a", "&a [1]", "{a: 1}", "[1, 2, 3]", "null", "true", "auto", "!!python/object:os.system ls", "'"]
    ),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(main, *args) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, err.getvalue()


@FUZZ
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_config_override_is_accepted_or_refused_in_one_sentence(key, value):
    code, err = run(
        train_main, "--config", ROOT / "configs" / "quickstart.yaml", "--set", f"{key}={value}", "--print-config"
    )
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if ": error: " in line]) == 1 and len(err) < 1000


def read_rows(out: Path) -> list[list[str]]:
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f, strict=True))
    assert rows[0] == COLUMNS and all(len(r) == len(COLUMNS) for r in rows)
    return rows[1:]


# Folders are searched without hidden files (macOS leaves a "._" twin beside every copied image).
NAME_BYTES = st.binary(min_size=1, max_size=20).filter(lambda b: b"/" not in b and b"\0" not in b and b[:1] != b".")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAME_BYTES, min_size=1, max_size=4, unique=True))
def test_any_file_names_are_scored_once_and_read_back(trained_checkpoint, names):
    image = make_split("test", 1, 32, 0.5, seed=1)[0][0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        listed = []
        for name in names:
            path = os.fsencode(folder) + b"/" + name + b".png"
            Image.fromarray(image).save(path.decode("utf-8", "surrogateescape"), format="PNG")
            listed.append(path)
        out = Path(tmp) / "scores.csv"
        for _ in range(2):  # the second run must read the first run's output and score nothing twice
            code, err = run(predict_main, "--checkpoint", trained_checkpoint, "--out", out, folder)
            assert code == 0, err
            rows = read_rows(out)
            assert len(rows) == len(names) and len({r[0] for r in rows}) == len(names)
        assert {os.fsencode(unescape_path(r[0])) for r in rows} == set(listed)
        out.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names hold


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), kind=st.sampled_from(["PNG", "JPEG", "BMP", "TIFF"]))
def test_any_image_bytes_give_a_score_or_a_reason(trained_checkpoint, data, kind):
    buf = io.BytesIO()
    Image.fromarray(make_split("test", 1, 48, 0.5, seed=2)[0][0]).save(buf, format=kind)
    original = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(original) - 1))
        original[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(original)))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "x.img").mkdir()
        path = Path(tmp) / "x.img" / f"mutated.{kind.lower()}"
        path.write_bytes(bytes(original[:cut]))
        out = Path(tmp) / "scores.csv"
        code, err = run(predict_main, "--checkpoint", trained_checkpoint, "--out", out, path)
        assert code in (0, 4) and "Traceback" not in err, err
        (row,) = read_rows(out)
        assert (row[1] != "") != (row[4] != "")  # a probability or a reason, never both, never neither
        shutil.rmtree(Path(tmp) / "x.img")
