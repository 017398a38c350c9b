"""Throughput of pneumo's data path against a typical PyTorch pipeline, on the same images and model.

typical: torchvision ImageFolder, PIL decoding and per-item transforms in DataLoader workers, NCHW,
float32, as most public pneumonia repositories write it. pneumo: images decoded once into the
preprocessing cache, held as a uint8 tensor (on the GPU when there is one), augmented a batch at a
time, channels_last, bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo.config import AugmentConfig, ModelConfig
from pneumo.data.cache import cached_decode
from pneumo.data.folder import list_split
from pneumo.device import prepare, training_dtype
from pneumo.engine import Optimization, TrainingData, predict, train_one_epoch
from pneumo.models import build_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_pneumo(
    root: Path,
    size: int,
    model_cfg: ModelConfig,
    device: torch.device,
    batch: int,
    cache_dir: Path,
    precision: str = "auto",
) -> dict:
    paths, labels = list_split(root, "train")
    cached_decode(paths, size, 10**8, False, cache_dir)  # the first run's decode, not timed here
    start = time.perf_counter()
    images, _ = cached_decode(paths, size, 10**8, False, cache_dir)
    images = torch.from_numpy(np.array(images))  # out of the read-only memory map, into RAM (timed: that is the load)
    y = torch.from_numpy(labels)
    if device.type == "cuda":
        images, y = images.to(device), y.to(device)
    _sync(device)
    load_s = time.perf_counter() - start

    torch.manual_seed(0)
    model = prepare(build_model(model_cfg), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = training_dtype(precision, device)
    opt = Optimization(
        model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), nn.BCEWithLogitsLoss(), dtype
    )
    data = TrainingData(images, y, batch, AugmentConfig(), torch.Generator().manual_seed(0), device)
    train_one_epoch(opt, data, "benchmark: pneumo")  # warm-up: allocator, cuDNN autotuning
    _sync(device)
    start = time.perf_counter()
    _, data_s = train_one_epoch(opt, data, "benchmark: pneumo")
    _sync(device)
    train_s = time.perf_counter() - start

    predict(model, images, 128, device)
    start = time.perf_counter()
    predict(model, images, 128, device)
    _sync(device)
    infer_s = time.perf_counter() - start
    n = len(paths)
    return {
        "train_images_per_s": n / train_s,
        "load_images_per_s": n / load_s,
        "infer_images_per_s": n / infer_s,
        "data_wait_fraction": data_s / train_s,
        "images": n,
        "train_dtype": str(dtype).removeprefix("torch."),
    }


def _typical_datasets(root: Path, size: int):
    from torchvision import datasets, transforms

    # The usual transforms; normalization is left to the model, which does it for both pipelines alike.
    train_tf = transforms.Compose(
        [
            transforms.Grayscale(1),
            transforms.Resize((size, size)),
            transforms.RandomAffine(7, translate=(0.05, 0.05), scale=(0.92, 1.08)),
            transforms.ColorJitter(0.1, 0.1),
            transforms.ToTensor(),
        ]
    )
    eval_tf = transforms.Compose([transforms.Grayscale(1), transforms.Resize((size, size)), transforms.ToTensor()])
    return (
        datasets.ImageFolder(str(root / "train"), transform=train_tf),
        datasets.ImageFolder(str(root / "train"), transform=eval_tf),
    )


def bench_typical(
    root: Path, size: int, model_cfg: ModelConfig, device: torch.device, batch: int, workers: int
) -> dict:
    train_set, eval_set = _typical_datasets(root, size)
    pin = device.type == "cuda"

    def loader(ds, shuffle):
        return torch.utils.data.DataLoader(
            ds, batch_size=batch, shuffle=shuffle, num_workers=workers, pin_memory=pin, persistent_workers=False
        )

    n = len(train_set)
    start = time.perf_counter()
    for _ in loader(train_set, True):
        pass
    load_s = time.perf_counter() - start

    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)  # the same network, NCHW, float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()

    def epoch():
        model.train()
        for x, y in loader(train_set, True):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).float()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    epoch()
    _sync(device)
    start = time.perf_counter()
    epoch()
    _sync(device)
    train_s = time.perf_counter() - start

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader(eval_set, False):
            torch.sigmoid(model(x.to(device, non_blocking=True))).cpu()
    _sync(device)
    infer_s = time.perf_counter() - start
    return {
        "train_images_per_s": n / train_s,
        "load_images_per_s": n / load_s,
        "infer_images_per_s": n / infer_s,
        "images": n,
    }


def peak_bf16_tflops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of known GPUs, for the utilization figure."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (
        ("H200", 989.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L4", 121.0),
        ("A10", 125.0),
        ("4090", 165.0),
    ):
        if key in name:
            return tflops
    return None


def model_flops_per_image(model_cfg: ModelConfig, size: int) -> float:
    """Training FLOPs per image: 3x the forward multiply-adds of the convolutions and the linear "
    "layer, x2 FLOPs each."""
    macs, c_in, hw = 0, 1, size
    for i, c in enumerate(model_cfg.channels):
        hw = math.ceil(hw / (model_cfg.stem_stride if i == 0 else 1))
        macs += hw * hw * c * c_in * 9
        hw //= 2
        c_in = c
    macs += c_in
    return 3 * 2 * macs


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
