"""Run a trained checkpoint with the NumPy reference network instead of torch."""

from __future__ import annotations

import numpy as np

from pneumo import numpy_nn
from pneumo.config import from_dict
from pneumo.models import INPUT_MEAN, INPUT_STD
from pneumo.progress import batches


def numpy_model_from_checkpoint(ckpt: dict, dtype=np.float64) -> numpy_nn.SmallCNN:
    """The checkpoint's architecture in NumPy with its trained weights, in eval mode."""
    m = from_dict(ckpt["config"]).model
    model = numpy_nn.SmallCNN(m.channels, m.stem_stride, m.dropout, INPUT_MEAN, INPUT_STD, dtype=dtype)
    # torch counts BatchNorm steps in num_batches_tracked; only momentum=None uses it, and pneumo does not.
    state = {k: v.numpy() for k, v in ckpt["model"].items() if not k.endswith("num_batches_tracked")}
    model.load_state_dict(state)
    return model.eval()


def predict_numpy(model: numpy_nn.SmallCNN, images: np.ndarray, batch_size: int, desc: str = "predicting (numpy)") -> np.ndarray:
    """Probabilities of pneumonia for uint8 images (N, H, W), as engine.predict computes them with torch."""
    dtype = model.features[0].params["weight"].dtype
    out = []
    for part in batches(len(images), batch_size, desc):
        x = images[part, None].astype(dtype) / 255
        out.append(numpy_nn.sigmoid(model.forward(x)))
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
