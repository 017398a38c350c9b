"""Exporting a checkpoint to TorchScript or ONNX, checked against the checkpoint before it is kept.

The exported graph maps images (N, 1, H, W), float in [0, 1], to pneumonia logits (N,); the
threshold, image size and provenance travel inside the file as `pneumo.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from pneumo.core.errors import PneumoError
from pneumo.core.logs import log
from pneumo.model.checkpoint import TrainedModel

TOLERANCE = 1e-5


def export(trained: TrainedModel, fmt: str, out: str | Path) -> float:
    """Write the export to `out` and return the largest difference from the checkpoint's logits."""
    model = trained.network().folded()
    size = trained.config.data.image_size
    meta = {
        "format": "pneumo-export/1",
        "threshold": trained.threshold,
        "image_size": size,
        "input": "images (N, 1, H, W), float32 in [0, 1]",
        "output": "logits (N,); sigmoid(logit) is the probability of pneumonia",
        "checkpoint": trained.model_id,
        "model": dataclasses.asdict(trained.config.model),
        "provenance": trained.provenance,
    }
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, 1, size, size, generator=gen)
    # Other batch sizes than the traced one, and real-looking extremes (black, white).
    samples = torch.cat(
        [torch.rand(5, 1, size, size, generator=gen), torch.zeros(1, 1, size, size), torch.ones(1, 1, size, size)]
    )
    with torch.no_grad():
        expected = model(samples).numpy()

    out = Path(out)
    if out.is_dir() or not out.name:
        raise PneumoError(f"--out {out} is a folder: name the file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "torchscript":
            got = _torchscript(model, example, samples, meta, tmp)
        elif fmt == "onnx":
            got = _onnx(model, example, samples, meta, tmp)
        else:
            raise PneumoError(f"unknown export format '{fmt}' (expected torchscript or onnx)")
        diff = float(np.abs(got - expected).max()) if got is not None else float("nan")
        if diff > TOLERANCE:
            raise PneumoError(
                f"the exported model differs from the checkpoint by {diff:.2e} (more than {TOLERANCE}): not written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def _torchscript(model, example, samples, meta, tmp: Path) -> np.ndarray:
    with warnings.catch_warnings():
        # torch 2.10+ marks TorchScript deprecated; it still runs everywhere libtorch does, without Python.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(tmp), _extra_files={"pneumo.json": json.dumps(meta)})
        with torch.no_grad():
            return torch.jit.load(str(tmp)).eval()(samples).numpy()


def _onnx(model, example, samples, meta, tmp: Path) -> np.ndarray | None:
    try:
        import onnx
    except ImportError:
        raise PneumoError("ONNX export needs the onnx extra: pip install 'pneumo[onnx]'") from None
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["logit"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    proto.metadata_props.add(key="pneumo.json", value=json.dumps(meta))
    onnx.save(proto, str(tmp))
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file was not checked against the checkpoint")
        return None
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": samples.numpy()})[0]


def is_torchscript(path: str | Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("extra/pneumo.json") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """An exported TorchScript model and its pneumo.json metadata."""
    extra = {"pneumo.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation, see _torchscript
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return model.eval(), json.loads(extra["pneumo.json"])
