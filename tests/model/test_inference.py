"""Batched inference (pneumo.model.inference)."""

import numpy as np
import torch

from pneumo.model import inference
from pneumo.model.network import SmallCNN


def test_inference_runs_in_float32_on_every_device(monkeypatch):
    """bf16 autocast moved the shipped model's probabilities by up to 0.009: inference must not autocast,
    on CUDA either. The CUDA branch runs here on the CPU: inputs stay where they are, and any autocast
    entered is recorded."""
    entered = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: entered.append((a, k)) or real("cpu", enabled=False))
    monkeypatch.setattr(inference, "to_input", lambda batch, device: batch.unsqueeze(1).float().div(255))
    model = SmallCNN([4, 8], stem_stride=2).eval()
    images = torch.randint(0, 256, (5, 32, 32), dtype=torch.uint8)
    out = inference.logits(model, images, 2, torch.device("cuda"))
    assert entered == []
    with torch.no_grad():
        expected = model(images.unsqueeze(1).float() / 255).double().numpy()
    assert out.dtype == np.float64 and np.allclose(out, expected, atol=1e-6)


def test_under_load_inference_takes_one_torch_thread_and_gives_the_same_bits(monkeypatch):
    """While other processes keep the machine busy each batch is scored on one torch thread (and the
    kernels on one numba thread); the setting comes back when the load goes, and after the run."""
    from pneumo.cpu import loader

    torch.manual_seed(0)
    model = SmallCNN([8, 16, 32], stem_stride=2).to(memory_format=torch.channels_last).eval().folded()
    images = torch.randint(0, 256, (12, 64, 64), dtype=torch.uint8)
    threads = []
    model.register_forward_pre_hook(lambda *_: threads.append(torch.get_num_threads()))
    # Other work keeps 1.5 cores busy while the second and third of six batches are scored.
    monkeypatch.setattr(loader.OTHERS, "cores", lambda: 1.5 if len(threads) in (1, 2) else 0.0)
    torch.set_num_threads(2)
    shifting = inference.logits(model, images, 2, torch.device("cpu"))
    assert threads == [2, 1, 1, 2, 2, 2] and torch.get_num_threads() == 2
    monkeypatch.setattr(loader.OTHERS, "cores", lambda: 0.0)
    idle = inference.logits(model, images, 2, torch.device("cpu"))
    monkeypatch.setattr(loader.OTHERS, "cores", lambda: 1.5)
    busy = inference.logits(model, images, 2, torch.device("cpu"))
    assert torch.get_num_threads() == 2
    assert np.array_equal(shifting, idle) and np.array_equal(busy, idle)
