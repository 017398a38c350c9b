"""The CUDA path itself: skipped without a GPU; `scripts/gpu_check.py` runs them (`pytest -m gpu`) on a
machine with one. Everything they check is also checked on the CPU with the GPU's decisions stood in for
(tests/core/test_device.py, tests/core/test_distributed.py, tests/model/test_inference.py)."""

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_raw
from pneumo.core.config import AugmentConfig, from_dict
from pneumo.data.augment import augment
from pneumo.data.synthetic import make_split
from pneumo.model.checkpoint import TrainedModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_training_on_the_gpu_gives_a_model_any_machine_can_use(tmp_path):
    from pneumo.train.run import train

    raw = tiny_raw(tmp_path / "run", train={"epochs": 2})
    train(from_dict({**raw, "device": "cuda"}))
    model = TrainedModel.load(tmp_path / "run" / "best.pt")
    assert model.config.device == "cuda" and model.device == "auto"
    images, _ = make_split("test", 32, 32, 0.5, seed=1)
    on_gpu, on_cpu = model.logits(images, CUDA), model.logits(images, torch.device("cpu"))
    assert np.abs(torch.sigmoid(torch.from_numpy(on_gpu)) - torch.sigmoid(torch.from_numpy(on_cpu))).max() <= 1e-3


def test_the_shipped_model_scores_the_same_on_the_gpu_and_the_cpu():
    model = TrainedModel.load(ROOT / "models" / "kermany.pt")
    images, _ = make_split("test", 64, 224, 0.5, seed=2)
    p_gpu = torch.sigmoid(torch.from_numpy(model.logits(images, CUDA)))
    p_cpu = torch.sigmoid(torch.from_numpy(model.logits(images, torch.device("cpu"))))
    assert (p_gpu - p_cpu).abs().max() <= 1e-3
    _, scores_gpu = model.scored(images, CUDA)
    _, scores_cpu = model.scored(images, torch.device("cpu"))
    assert np.array_equal(scores_gpu > model.applicability.threshold, scores_cpu > model.applicability.threshold)


def test_augmentation_draws_the_same_on_the_gpu():
    """Random numbers come from the CPU generator, so a batch is augmented alike on either device
    (up to the devices' rounding; the noise field is drawn on the device, so it is off here)."""
    cfg = AugmentConfig(rotate_deg=10, scale=0.1, brightness=0.1, contrast=0.1, gamma=0.2, blur=1.0, erase=0.5)
    x = torch.rand(8, 1, 64, 64)
    on_cpu = augment(x, cfg, torch.Generator().manual_seed(0))
    on_gpu = augment(x.to(CUDA), cfg, torch.Generator().manual_seed(0)).cpu()
    assert (on_cpu - on_gpu).abs().max() <= 1e-4
