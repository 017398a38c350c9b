"""Throughput of pneumo against a typical PyTorch pipeline, on the same images and model, and against
the machine's own limit.

typical: torchvision ImageFolder, PIL decoding and per-item transforms in DataLoader workers, the
network as a plain sequence of modules (`AsWritten`), NCHW, float32, as most public pneumonia
repositories write it. pneumo: images decoded once into the preprocessing cache and held as a uint8
tensor (on the GPU when there is one), augmented a batch at a time, channels_last, its allocator
tuned (as its command lines do), bf16 where the hardware has it, BatchNorm folded into the
convolutions for inference.

Each pipeline runs in a process of its own (`python benchmarks/pipelines.py {pneumo,typical} SETTINGS`),
so that neither inherits the other's allocator, threads or caches.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo.core.config import AugmentConfig, ModelConfig
from pneumo.core.device import cpu_has_amx, prepare, resolve_device, training_dtype
from pneumo.core.load import busy_now
from pneumo.core.process import threads_sleep_in
from pneumo.data.cache import cached_decode
from pneumo.data.folder import list_split
from pneumo.model.inference import predict
from pneumo.model.network import SmallCNN, build_model, normalize
from pneumo.train.engine import Optimization, TrainingData, train_one_epoch


@dataclass
class Settings:
    root: str  # a Kermany-style folder; its train split is used
    size: int
    channels: list[int]
    stem_stride: int
    device: str
    batch: int
    workers: int  # DataLoader workers of the typical pipeline
    cache_dir: str
    precision: str = "auto"
    repeats: int = 1  # timed epochs (and inference passes) per pipeline: the median is reported

    def model_config(self) -> ModelConfig:
        return ModelConfig(channels=self.channels, stem_stride=self.stem_stride)


def bench_pneumo(s: Settings) -> dict:
    device = resolve_device(s.device)
    paths, labels = list_split(s.root, "train")
    cached_decode(paths, s.size, 10**8, False, s.cache_dir)  # the first run's decode, not timed here
    start = time.perf_counter()
    images, _ = cached_decode(paths, s.size, 10**8, False, s.cache_dir)
    images = torch.from_numpy(np.array(images))  # out of the memory map into RAM: timed, that is the load
    y = torch.from_numpy(labels)
    if device.type == "cuda":
        images, y = images.to(device), y.to(device)
    _sync(device)
    load_s = time.perf_counter() - start

    torch.manual_seed(0)
    model = prepare(build_model(s.model_config()), device)
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.01)  # as pneumo-train builds it
    dtype = training_dtype(s.precision, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    opt = Optimization(model, optimizer, schedule, nn.BCEWithLogitsLoss(), dtype)
    data = TrainingData(images, y, s.batch, AugmentConfig(), torch.Generator().manual_seed(0), device)
    torch.backends.cudnn.benchmark = True  # every batch has one shape: let cuDNN pick its kernels once
    train_one_epoch(opt, data, "benchmark: pneumo")  # warm-up: allocator, cuDNN's kernel choice
    train_s, data_s = _median_timed(device, lambda: train_one_epoch(opt, data, "benchmark: pneumo")[1], s.repeats)

    inference = prepare(model.eval().folded(), device)
    predict(inference, images, 64, device)
    infer_s, _ = _median_timed(device, lambda: predict(inference, images, 64, device), s.repeats)
    n = len(paths)
    return {
        "train_images_per_s": n / train_s,
        "load_images_per_s": n / load_s,
        "infer_images_per_s": n / infer_s,
        "data_wait_fraction": data_s / train_s,
        "images": n,
        "train_dtype": str(dtype).removeprefix("torch."),
        "openmp_wait": os.environ.get("OMP_WAIT_POLICY", "unset"),
    }


def bench_typical(s: Settings) -> dict:
    device = resolve_device(s.device)
    train_set, eval_set = _typical_datasets(Path(s.root), s.size)

    def loader(ds, shuffle):
        return torch.utils.data.DataLoader(
            ds, batch_size=s.batch, shuffle=shuffle, num_workers=s.workers, pin_memory=device.type == "cuda"
        )

    n = len(train_set)
    load_s, _ = _timed(device, lambda: [None for _ in loader(train_set, True)])
    torch.manual_seed(0)
    model = AsWritten(build_model(s.model_config())).to(device)  # the same network, NCHW, float32
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
    train_s, _ = _median_timed(device, epoch, s.repeats)
    model.eval()

    def infer():
        with torch.no_grad():
            for x, _ in loader(eval_set, False):
                torch.sigmoid(model(x.to(device, non_blocking=True))).cpu()

    infer_s, _ = _median_timed(device, infer, s.repeats)
    return {
        "train_images_per_s": n / train_s,
        "load_images_per_s": n / load_s,
        "infer_images_per_s": n / infer_s,
        "images": n,
    }


class AsWritten(nn.Module):
    """A SmallCNN run as public repositories write such a network: an nn.Sequential of conv, BatchNorm,
    ReLU and max-pool blocks. The same parameters and function, without SmallCNN's own rewrites
    (pooling before the ReLU, pooling without indices at inference), which are pneumo's, not the
    typical pipeline's."""

    def __init__(self, net: SmallCNN):
        super().__init__()
        self.net = net

        # torch's own max-pool, not SmallCNN's index-free one (MaxPool2x2).
        self.features = nn.Sequential(*(nn.MaxPool2d(2) if isinstance(m, nn.MaxPool2d) else m for m in net.features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.features(normalize(x))).squeeze(1)


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


def _median_timed(device: torch.device, work, repeats: int) -> tuple[float, object]:
    """The median of `repeats` timings of `work`, with that run's result: one epoch slowed or sped up by
    something else on the machine moves neither pipeline's figure."""
    runs = sorted((_timed(device, work) for _ in range(repeats)), key=lambda run: run[0])
    return runs[len(runs) // 2]


def _timed(device: torch.device, work) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = work()
    _sync(device)
    return time.perf_counter() - start, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Peak:
    """The arithmetic peak of this machine's CPU cores: cores x SIMD lanes x FMA units x 2 x clock."""

    cpu: str
    cores: int
    fp32_lanes: int
    fma_units: int
    ghz: float
    clock_source: str
    amx: bool

    @property
    def fp32_gflops(self) -> float:
        return self.cores * self.fp32_lanes * self.fma_units * 2 * self.ghz

    @property
    def bf16_amx_gflops(self) -> float | None:
        # An AMX tile unit does 1024 bf16 multiply-adds per cycle per core (Intel's figure for Sapphire Rapids).
        return self.cores * 1024 * 2 * self.ghz if self.amx else None

    def assumptions(self) -> str:
        return (
            f"{self.cores} cores x {self.fp32_lanes} float32 lanes x {self.fma_units} FMA units x 2 x "
            f"{self.ghz:.2f} GHz "
            f"({self.clock_source})"
        )


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """The rate torch's own dense matrix product reaches here: measured, not assumed, so it holds where
    the nominal peak cannot be known (a VM reports a clock its cores may exceed). A convolution is a
    matrix product in disguise and can hope for about this, no more."""
    a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(device, dtype) for i in (0, 1))
    out = torch.mm(a, b)
    _sync(device)
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or reps < 2:
        torch.mm(a, b, out=out)
        _sync(device)
        reps += 1
    return 2 * n**3 * reps / elapsed / 1e9


def cpu_peak() -> Peak:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    vendor, family, model = info.get("vendor_id", ""), int(info.get("cpu family", 0)), int(info.get("model", 0))
    # AMD's first Zen cores split each 256-bit FMA into two 128-bit halves: one 256-bit FMA per cycle.
    fma = 1 if vendor == "AuthenticAMD" and family == 0x17 and model < 0x30 else 2
    ghz, source = _clock_ghz(info)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(cores, torch.get_num_threads())
    name = info.get("model name", platform.processor() or "unknown CPU")
    return Peak(name, cores, lanes, fma, ghz, source, cpu_has_amx())


def _cpuinfo() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def _clock_ghz(info: dict) -> tuple[float, str]:
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "maximum clock from cpufreq"
    except (OSError, ValueError):
        pass
    match = re.search(r"@ ([0-9.]+)GHz", info.get("model name", ""))
    if match:
        return float(match.group(1)), "nominal clock from the model name; turbo may exceed it"
    mhz = float(info.get("cpu MHz", 0) or 0)
    return mhz / 1000, "clock /proc/cpuinfo reports (no cpufreq here, as in most VMs); turbo may exceed it"


def main(argv: list[str]) -> int:
    """python benchmarks/pipelines.py {pneumo,typical} SETTINGS_JSON: one pipeline, its results as JSON."""
    which, settings = argv[0], Settings(**json.loads(argv[1]))
    if which == "pneumo":
        from pneumo.core.process import tune_allocator

        tune_allocator()
    result = (bench_pneumo if which == "pneumo" else bench_typical)(settings)
    print(json.dumps(result))
    return 0


# A process that only spins, as another job on a shared machine would, until its parent (the benchmark)
# is gone: a benchmark killed outright leaves no load behind.
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


@contextmanager
def busy_processes(n: int):
    """`n` busy processes beside whatever runs in the block, ended when it ends."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_isolated(which: str, settings: Settings) -> dict:
    """One pipeline's benchmark in a fresh process. pneumo's starts as pneumo-train does: its idle OpenMP
    threads sleep where the machine is busy (`core.process.idle_threads_sleep`); the typical pipeline's
    keep OpenMP's default, as a plain PyTorch script does."""
    import subprocess

    env = dict(os.environ)
    if which == "pneumo":
        threads_sleep_in(env, busy_now)
    proc = subprocess.run(
        [sys.executable, __file__, which, json.dumps(asdict(settings))],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {which} benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gpu_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of known GPUs, by whole words of their name, the most specific first
    (an H100 PCIe is not an H100 SXM, an L40 is not an L4)."""
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in GPU_BF16_TFLOPS if re.search(rf"\b{key}\b", name)), None)


# NVIDIA's data sheets, dense (no sparsity).
GPU_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("4090", 165.0),
)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
