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
