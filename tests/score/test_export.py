import csv
import json

import numpy as np
import pytest
import torch

from conftest import make_images
from pneumo.cli import export_main, predict_main
from pneumo.core.errors import PneumoError
from pneumo.model.checkpoint import TrainedModel
from pneumo.score.export import export, is_torchscript, load_torchscript


@pytest.fixture
def checkpoint(trained_checkpoint):
    return trained_checkpoint


def network(checkpoint):
    return TrainedModel.load(checkpoint).network()


def test_torchscript_export_matches_and_carries_metadata(tmp_path, checkpoint):
    diff = export(TrainedModel.load(checkpoint), "torchscript", tmp_path / "m.pt")
    assert diff <= 1e-5
    assert is_torchscript(tmp_path / "m.pt") and not is_torchscript(checkpoint)
    model, meta = load_torchscript(tmp_path / "m.pt")
    assert meta["threshold"] == TrainedModel.load(checkpoint).threshold and meta["image_size"] == 32
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), network(checkpoint)(x), atol=1e-5)


def test_onnx_export_matches_with_any_batch_size(tmp_path, checkpoint):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    assert export(TrainedModel.load(checkpoint), "onnx", tmp_path / "m.onnx") <= 1e-5
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["pneumo.json"])["image_size"] == 32
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((7, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = network(checkpoint)(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"image": x})[0] - expected).max() <= 1e-5


def test_predict_runs_an_exported_torchscript_file(tmp_path, checkpoint):
    export(TrainedModel.load(checkpoint), "torchscript", tmp_path / "m.pt")
    make_images(tmp_path / "imgs", 4, size=32)
    assert (
        predict_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.csv"), str(tmp_path / "imgs")]) == 0
    )
    # TorchScript is code: it runs only when the user says the file is trusted.
    assert (
        predict_main(["--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "b.csv"), str(tmp_path / "imgs")])
        == 3
    )
    assert not (tmp_path / "b.csv").exists()
    args = [
        "--trust-torchscript",
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--out",
        str(tmp_path / "b.csv"),
        str(tmp_path / "imgs"),
    ]
    assert predict_main(args) == 0
    a = {r["path"]: r for r in csv.DictReader(open(tmp_path / "a.csv"))}
    b = {r["path"]: r for r in csv.DictReader(open(tmp_path / "b.csv"))}
    assert a.keys() == b.keys()
    for path in a:
        assert abs(float(a[path]["probability"]) - float(b[path]["probability"])) <= 2e-6
        assert a[path]["label"] == b[path]["label"]


def test_export_failures_leave_nothing(tmp_path, checkpoint, monkeypatch, capsys):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert (
        export_main(
            ["--checkpoint", str(tmp_path / "junk.pt"), "--format", "torchscript", "--out", str(tmp_path / "o.pt")]
        )
        == 3
    )
    # An export whose outputs drift from the checkpoint is refused and not written.
    monkeypatch.setattr("pneumo.score.export.TOLERANCE", -1.0)
    with pytest.raises(PneumoError, match="differs from the checkpoint"):
        export(TrainedModel.load(checkpoint), "torchscript", tmp_path / "o.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt"]


@pytest.mark.parametrize("per_image", ["none", "equalize"])
def test_an_ensemble_with_mirror_averaging_exports_whole(tmp_path, tiny_config, per_image):
    """The whole model, its per-image step included, in the exported graph."""
    from pneumo.model.calibration import Calibration
    from pneumo.model.checkpoint import save_checkpoint
    from pneumo.model.network import build_model

    cfg = tiny_config(model={"tta": True, "per_image": per_image})
    torch.manual_seed(0)
    members = [build_model(cfg.model).state_dict() for _ in range(3)]
    trained = TrainedModel(cfg, members, 0.5, "fixed", calibration=Calibration("platt", 0.8, 0.2))
    save_checkpoint(tmp_path / "ens.pt", trained.payload())
    assert export(TrainedModel.load(tmp_path / "ens.pt"), "torchscript", tmp_path / "ens.ts") <= 1e-5
    pytest.importorskip("onnxruntime")
    assert export(TrainedModel.load(tmp_path / "ens.pt"), "onnx", tmp_path / "ens.onnx") <= 1e-5
