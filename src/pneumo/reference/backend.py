"""Run a trained model with the NumPy reference network instead of torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumo import reference as numpy_nn
from pneumo.core.progress import batches
from pneumo.model.checkpoint import TrainedModel
from pneumo.model.network import INPUT_MEAN, INPUT_STD


@dataclass
class NumpyClassifier:
    """models.Classifier in NumPy: the members' mean logit (with `tta`, also over the mirror image),
    mapped by scale * logit + bias."""

    members: list[numpy_nn.SmallCNN]
    tta: bool = False
    scale: float = 1.0
    bias: float = 0.0

    @property
    def dtype(self):
        return self.members[0].features[0].params["weight"].dtype

    def forward(self, x: np.ndarray) -> np.ndarray:
        logit = self._mean_logit(x)
        if self.tta:
            logit = (logit + self._mean_logit(x[..., ::-1])) / 2
        return logit * self.scale + self.bias

    def _mean_logit(self, x: np.ndarray) -> np.ndarray:
        return sum(member.forward(x) for member in self.members) / len(self.members)


def numpy_classifier(model: TrainedModel, dtype=np.float64) -> NumpyClassifier:
    """The trained model's architecture in NumPy with its weights, in eval mode."""
    m = model.config.model
    members = []
    for state in model.members:
        member = numpy_nn.SmallCNN(
            m.channels, m.stem_stride, m.dropout, INPUT_MEAN, INPUT_STD, m.per_image, dtype=dtype
        )
        member.load_state_dict(numpy_state(state))
        members.append(member.eval())
    cal = model.calibration
    return NumpyClassifier(members, model.config.model.tta, cal.scale, cal.bias)


def numpy_state(state: dict) -> dict[str, np.ndarray]:
    """A torch state dict as NumPy arrays. torch counts BatchNorm steps in num_batches_tracked; only
    momentum=None uses it, and pneumo does not."""
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def predict_numpy(
    net: NumpyClassifier, images: np.ndarray, batch_size: int, desc: str = "predicting (numpy)"
) -> np.ndarray:
    """Probabilities of pneumonia for uint8 images (N, H, W), as engine.predict computes them with torch."""
    out = []
    for part in batches(len(images), batch_size, desc):
        x = images[part, None].astype(net.dtype) / 255
        out.append(numpy_nn.sigmoid(net.forward(x)))
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
