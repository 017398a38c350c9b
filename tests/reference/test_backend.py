import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import KERMANY224, needs_shared, tiny_raw
from pneumo.core.config import from_dict
from pneumo.core.device import prepare
from pneumo.data.images import decode_all
from pneumo.evaluate.evaluation import EvalOptions, evaluate
from pneumo.model.checkpoint import TrainedModel
from pneumo.model.inference import predict
from pneumo.reference.backend import numpy_classifier, predict_numpy
from pneumo.train.run import train


@pytest.fixture(scope="module")
def production_checkpoint(tmp_path_factory):
    """The production architecture (4 blocks, 224x224), trained briefly so BatchNorm holds real statistics."""
    out = tmp_path_factory.mktemp("prod") / "run"
    raw = tiny_raw(
        out,
        data={"image_size": 224, "synthetic": {"n_train": 64, "n_val": 32, "n_test": 32}},
        model={"channels": [16, 32, 64, 128], "stem_stride": 2},
        train={"epochs": 1},
    )
    train(from_dict(raw))
    return out / "best.pt"


def real_images(n=16) -> np.ndarray:
    paths = sorted(str(p) for p in (KERMANY224 / "val").glob("*/*.jpeg"))[:n]
    return decode_all(paths, 224, 100_000_000, skip_bad=False, workers=2)[0]


@needs_shared
def test_numpy_matches_torch_on_real_xrays(production_checkpoint):
    model = TrainedModel.load(production_checkpoint)
    images = real_images()
    p_numpy = predict_numpy(numpy_classifier(model), images, batch_size=8)

    # float64 on both sides: the two implementations agree to rounding.
    torch_model = model.network().double()
    with torch.no_grad():
        p_torch64 = torch.sigmoid(torch_model(torch.from_numpy(images[:, None] / 255.0))).numpy()
    assert np.abs(p_numpy - p_torch64).max() <= 1e-6
    assert np.abs(p_numpy - p_torch64).max() < 1e-12  # in fact
    # Against the production float32 torch path as well.
    p_torch32 = predict(prepare(model.network(), torch.device("cpu")), torch.from_numpy(images), 8, torch.device("cpu"))
    assert np.abs(p_numpy - p_torch32).max() < 1e-5
    assert p_numpy.std() > 1e-3  # distinct images get distinct outputs


def test_evaluate_with_numpy_backend_gives_the_same_metrics(production_checkpoint, tmp_path):
    model = TrainedModel.load(production_checkpoint)
    torch_metrics = evaluate(model, "val", tmp_path / "torch")
    numpy_metrics = evaluate(model, "val", tmp_path / "numpy", EvalOptions(backend="numpy"))
    assert numpy_metrics.pop("backend") == "numpy" and torch_metrics.pop("backend") == "torch"
    assert numpy_metrics["confusion_matrix"] == torch_metrics["confusion_matrix"]
    for key in ("auc", "f1", "accuracy", "sensitivity", "specificity", "precision"):
        assert numpy_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-12), key
    assert json.loads((tmp_path / "numpy" / "metrics.json").read_text())["backend"] == "numpy"


def test_numpy_nn_never_imports_torch():
    code = "import sys, pneumo.reference; assert 'torch' not in sys.modules, 'torch was imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize("per_image", ["none", "standardize", "equalize"])
def test_numpy_runs_ensembles_with_mirror_averaging_and_calibration(tmp_path, tiny_config, per_image):
    from dataclasses import replace

    from pneumo.model.calibration import Calibration
    from pneumo.model.network import build_model

    cfg = tiny_config(model={"tta": True, "per_image": per_image})
    torch.manual_seed(0)
    members = [build_model(cfg.model).state_dict() for _ in range(2)]
    model = TrainedModel(config=cfg, members=members, threshold=0.5, threshold_method="fixed")
    model = replace(model, calibration=Calibration("platt", 0.7, -0.3))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    p_numpy = predict_numpy(numpy_classifier(model), images, batch_size=2)
    with torch.no_grad():
        p_torch = torch.sigmoid(model.network().double()(torch.from_numpy(images[:, None] / 255.0))).numpy()
    assert np.abs(p_numpy - p_torch).max() < 1e-12
