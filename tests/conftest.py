"""Shared test helpers: paths, tiny configs, a trained tiny model, synthetic image folders, running the
command lines the way users and cron jobs do, and folded blocks for the CPU kernels' tests."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from pneumo.core.config import from_dict
from pneumo.data.synthetic import make_split

ROOT = Path(__file__).resolve().parents[1]
# The real Kermany files live beside the checkout (../shared/data); PNEUMO_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("PNEUMO_SHARED_DATA", ROOT.parent / "shared" / "data"))
KERMANY224 = SHARED_DATA / "kermany224"
FULLRES = SHARED_DATA / "kermany_fullres_sample"
TIMING = ("train_images_per_s", "epoch_s", "data_wait_fraction")

needs_shared = pytest.mark.skipif(not KERMANY224.is_dir(), reason=f"real data not found at {SHARED_DATA}")


def folded_conv(c_in: int, c_out: int, stride: int = 1, seed: int = 0) -> nn.Conv2d:
    """A folded block's 3x3 convolution: biased, weights on the scale of a trained network's, channels_last."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1).requires_grad_(False)
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2 / (9 * c_in)) ** 0.5)
    conv.bias.copy_(torch.randn(c_out, generator=gen) * 0.1)
    return conv.to(memory_format=torch.channels_last)


def conv_pool_relu_reference(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """relu(maxpool2x2(conv(x))) by torch's operators in float64."""
    y = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=conv.stride, padding=1)
    return torch.relu(F.max_pool2d(y, 2))


def tiny_raw(out_dir, **sections) -> dict:
    """A config small enough to train in about a second: 32x32 synthetic images, two blocks."""
    raw = {
        "seed": 0,
        "device": "cpu",
        # The decoded-image cache goes beside the run, never into the home folder of whoever runs the tests.
        "data": {
            "format": "synthetic",
            "image_size": 32,
            "cache_dir": str(Path(out_dir).parent / "cache"),
            "synthetic": {"n_train": 96, "n_val": 48, "n_test": 48},
        },
        "model": {"channels": [8, 16], "stem_stride": 1},
        "train": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, "patience": 0},
        "output": {"dir": str(out_dir)},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


@pytest.fixture
def tiny_config(tmp_path):
    def make(**sections):
        return from_dict(tiny_raw(tmp_path / "run", **sections))

    return make


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """best.pt of a tiny model trained for one epoch, shared by the tests that only read it."""
    from pneumo.train.run import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(from_dict(tiny_raw(out, train={"epochs": 1})))
    return out / "best.pt"


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory) -> tuple[Path, dict]:
    """(best.pt, the best epoch's figures) of a model trained long enough to learn the synthetic task."""
    from pneumo.train.run import train

    out = tmp_path_factory.mktemp("learned") / "run"
    raw = tiny_raw(
        out,
        data={"image_size": 64, "synthetic": {"n_train": 600, "n_val": 200, "n_test": 16}},
        model={"channels": [16, 32, 64], "stem_stride": 1},
        train={"epochs": 6, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5},
    )
    return out / "best.pt", train(from_dict(raw))


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def history(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings, which differ from run to run."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def make_images(folder: Path, n: int, size: int = 40) -> list[Path]:
    """n synthetic X-rays as PNG files in two subfolders of `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = make_split("test", n, size, 0.5, seed=5)
    paths = []
    for i, image in enumerate(images):
        sub = folder / ("a" if i % 2 else "b")  # nested, to exercise the recursive search
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"img{i:04d}.png")
        paths.append(sub / f"img{i:04d}.png")
    return paths


def run_script(script: str, *args, timeout: int = 180) -> subprocess.CompletedProcess:
    """scripts/SCRIPT as a real process, with no terminal and no stdin, as cron runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def call(main, *args) -> subprocess.CompletedProcess:
    """A command line in this process (same code path, no interpreter start-up): exit code and stderr."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_clean_failure(result, *phrases, code: int = 2) -> None:
    """One line on stderr that names the problem, the documented exit code, no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(error_lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in error_lines[0], error_lines[0]
