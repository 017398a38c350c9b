import numpy as np
import pytest
import torch

from pneumo.core.config import AugmentConfig
from pneumo.core.device import resolve_device, to_input
from pneumo.core.errors import PneumoError
from pneumo.model.inference import predict
from pneumo.model.network import SmallCNN
from pneumo.train.engine import Optimization, TrainingData, train_one_epoch


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PneumoError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_to_input_scales_to_unit_range():
    x = to_input(torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8), torch.device("cpu"))
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))


def test_predict_is_independent_of_batching_and_mode():
    torch.manual_seed(0)
    model = SmallCNN([4, 8], stem_stride=1, dropout=0.5)
    images = torch.randint(0, 255, (10, 16, 16), dtype=torch.uint8)
    a = predict(model, images, 4, torch.device("cpu"))
    b = predict(model, images, 10, torch.device("cpu"))  # eval mode: dropout off, BN running stats
    assert a.shape == (10,) and np.allclose(a, b, atol=1e-6)
    assert ((a > 0) & (a < 1)).all()


def test_an_epoch_lowers_the_loss_and_steps_the_schedule():
    torch.manual_seed(0)
    model = SmallCNN([8, 8], stem_stride=1, dropout=0.0)
    images = torch.randint(0, 120, (64, 16, 16), dtype=torch.uint8)
    labels = torch.arange(64) % 2
    images[labels == 1, 4:12, 4:12] += 120  # positives carry a bright square
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    opt = Optimization(model, optimizer, sched, torch.nn.BCEWithLogitsLoss(), torch.float32)
    data = TrainingData(
        images, labels, 16, AugmentConfig(enabled=False), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    losses = [train_one_epoch(opt, data, "test")[0] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]
    assert sched.last_epoch == 8 * 4  # stepped once per batch


def test_no_process_ever_gets_an_empty_batch():
    """7 images in global batches of 3 over 3 processes: the last global batch (1 image) would leave two
    processes without a row, and their BatchNorm (SyncBatchNorm on GPUs) with nothing; every process
    skips it alike, so all take the same number of steps."""
    from pneumo.core.distributed import Context

    images, labels = torch.zeros(7, 8, 8, dtype=torch.uint8), torch.zeros(7, dtype=torch.long)
    sizes = []
    for rank in range(3):
        ctx = Context(rank=rank, world=3)
        data = TrainingData(
            images, labels, 3, AugmentConfig(enabled=False), torch.Generator().manual_seed(0), torch.device("cpu"), ctx
        )
        sizes.append([len(y) for _, y in data.batches("test")])
    assert sizes == [[1, 1]] * 3
