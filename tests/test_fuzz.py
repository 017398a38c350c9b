"""Property-based tests over what users, admins and attackers feed the command lines: config values,
file names and image bytes. Whatever comes in: an exit code from the documented set, no traceback,
an output CSV that parses, no file scored twice, no input overwritten, and no checkpoint field used
against its meaning."""

import contextlib
import copy
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import ROOT
from pneumo.cli import predict_main, train_main
from pneumo.data.synthetic import make_split
from pneumo.model.checkpoint import TrainedModel, weights_digest
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


# Checkpoint fields as a damaged file or an attacker could leave them. DELETE removes the field.
DELETE = object()
FIELDS = [
    ("threshold",),
    ("threshold_method",),
    ("calibration", "scale"),
    ("calibration", "bias"),
    ("calibration", "method"),
    ("operating_points",),
    ("val_metrics",),
    ("provenance",),
    ("epoch",),
    ("config",),
    ("config", "model", "channels"),
    ("config", "model", "per_image"),
    ("config", "data", "image_size"),
    ("applicability",),
    ("applicability", "threshold"),
    ("applicability", "quantile"),
    ("applicability", "gaussians", "histogram", "precision"),
    ("members",),
    ("members", 0, "features.0.weight"),
    ("members", 0, "features.1.running_var"),
    ("format",),
]
TENSORS = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill, dtype=torch.float64).to(dtype),
    st.lists(st.integers(0, 4), max_size=4),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.complex64, torch.bool]),
    st.floats(allow_nan=True, allow_infinity=True),
)
FIELD_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**20), 10**20),
    st.text(max_size=10),
    st.sampled_from([None, True, DELETE, [], {}, [0.5], {"scale": 1.0}]),
    TENSORS,
    st.just("stride 0").map(lambda _: torch.zeros(1).expand(10_000, 10_000)),
)


def mutated(raw: dict, where: tuple, value, rehash: bool) -> dict:
    raw = copy.deepcopy(raw)
    parent = raw
    for key in where[:-1]:
        parent = parent[key] if isinstance(parent, list) else parent.setdefault(key, {})
    if value is DELETE:
        parent.pop(where[-1], None) if isinstance(parent, dict) else parent.pop(where[-1])
    else:
        parent[where[-1]] = value
    if rehash:  # an attacker who knows the format writes a matching checksum
        with contextlib.suppress(Exception):
            raw["weights_sha256"] = weights_digest(raw["members"])
    return raw


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(FIELDS), value=FIELD_VALUES, rehash=st.booleans())
def test_any_checkpoint_field_is_used_as_meant_or_refused_in_one_sentence(trained_checkpoint, where, value, rehash):
    """Exit 3 in one sentence, or a model whose every number means what it says: scores that are
    probabilities, labels on the side of the threshold they should be."""
    raw = torch.load(trained_checkpoint, weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(mutated(raw, where, value, rehash), path)
        Image.fromarray(make_split("test", 1, 32, 0.5, seed=3)[0][0]).save(Path(tmp) / "x.png")
        code, err = run(predict_main, "--checkpoint", path, "--out", Path(tmp) / "s.csv", Path(tmp) / "x.png")
        assert code in (0, 3, 4) and "Traceback" not in err, err
        if code == 3:
            assert len([line for line in err.splitlines() if ": error: " in line]) == 1 and len(err) < 1000
            return
        (row,) = read_rows(Path(tmp) / "s.csv")
        if code == 4:  # the config it carries refuses the image (data.image_size, say), and says so
            assert row[4] and not row[1]
            return
        threshold = TrainedModel.load(path).threshold
        assert 0 <= float(row[1]) <= 1 and row[2] == ("PNEUMONIA" if float(row[1]) >= threshold else "NORMAL")


OUTPUTS = [
    "input",
    "checkpoint",
    "folder",
    "/dev/null",
    "/dev/stdout",
    "link to input",
    "link to checkpoint",
    "loop",
    "missing folder",
    "lock name",
    "odd bytes",
    "fresh",
]


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(out=st.sampled_from(OUTPUTS), log=st.sampled_from([None, *OUTPUTS]))
def test_any_output_path_writes_only_what_was_named(trained_checkpoint, out, log):
    """--out and --log-file anywhere: the image and the checkpoint are never changed, the run either
    writes a readable CSV or stops in one sentence with a documented code."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "x.png"
        Image.fromarray(make_split("test", 1, 32, 0.5, seed=4)[0][0]).save(image)
        checkpoint = tmp / "model.pt"
        shutil.copy(trained_checkpoint, checkpoint)
        before = {p: p.read_bytes() for p in (image, checkpoint)}

        def path(kind):
            named = {
                "input": image,
                "checkpoint": checkpoint,
                "folder": tmp,
                "missing folder": tmp / "no" / "s.csv",
                "lock name": tmp / "s.csv.lock",
                "odd bytes": tmp / "\udcff\udcfe.csv",
                "fresh": tmp / "s.csv",
            }
            if kind in named:
                return named[kind]
            if kind.startswith("link") or kind == "loop":
                link = tmp / f"{kind.replace(' ', '_')}.csv"
                if not os.path.lexists(link):
                    os.symlink(link if kind == "loop" else image if "input" in kind else checkpoint, link)
                return link
            return Path(kind)

        args = ["--checkpoint", checkpoint, "--out", path(out), image]
        if log:
            args[:0] = ["--log-file", path(log)]
        code, err = run(predict_main, *args)
        assert code in (0, 2, 5) and "Traceback" not in err, err
        assert {p: p.read_bytes() for p in (image, checkpoint)} == before
        if code == 2:
            assert len([line for line in err.splitlines() if ": error: " in line]) == 1
        elif code == 0 and Path(path(out)).is_file() and not str(path(out)).startswith("/dev/"):
            assert len(read_rows(path(out))) == 1
