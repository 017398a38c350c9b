"""Loading the kernels and setting their threads (pneumo.cpu.loader)."""

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import pytest
import torch

from pneumo.cpu import loader
from pneumo.model.network import SmallCNN


def run_everything(network: SmallCNN, x: torch.Tensor) -> list[torch.Tensor]:
    """A training step's output and gradients, then the folded network's inference: every kernel."""
    net = copy.deepcopy(network)
    out = net(x)
    out.sum().backward()
    with torch.inference_mode():
        scores = net.eval().folded()(x)
    return [out.detach(), scores, *(p.grad for p in net.parameters())]


def test_rows_handed_out_a_few_at_a_time_give_the_same_bits(monkeypatch):
    """Each thread writes only its own rows' outputs and partial sums, so how a loop is shared out
    (numba's fixed halves, or CHUNK_ROWS at a time) cannot change a result."""
    torch.manual_seed(0)
    network = SmallCNN([8, 16, 32], stem_stride=2, dropout=0.0).to(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 64, 64)
    shared = run_everything(network, x)
    assert numba.get_parallel_chunksize() == loader.CHUNK_ROWS
    monkeypatch.setattr(loader, "CHUNK_ROWS", 0)  # numba's default: a fixed share per thread
    fixed = run_everything(network, x)
    assert numba.get_parallel_chunksize() == 0
    assert all(torch.equal(a, b) for a, b in zip(shared, fixed, strict=True))


def test_under_load_the_kernels_take_one_thread_and_give_the_same_bits(monkeypatch):
    torch.manual_seed(0)
    network = SmallCNN([8, 16, 32], stem_stride=2, dropout=0.0).to(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 64, 64)
    torch.set_num_threads(2)
    monkeypatch.setattr(loader.OTHERS, "cores", lambda: 0.0)
    idle = run_everything(network, x)
    assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    monkeypatch.setattr(loader.OTHERS, "cores", lambda: 1.5)
    busy = run_everything(network, x)
    assert numba.get_num_threads() == 1
    assert all(torch.equal(a, b) for a, b in zip(idle, busy, strict=True))


def read_only_install(root: Path) -> dict[str, str]:
    """A copy of pneumo where numba can keep no compiled kernels: no folder can be made beside the
    sources or in the user's cache (as in a read-only install run by a user whose HOME is unwritable)."""
    import pneumo

    shutil.copytree(Path(pneumo.__file__).parent, root / "pneumo", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pneumo" / "cpu" / "__pycache__").write_text("")  # a file where numba's folder would go
    (root / "home").write_text("")
    return {"PYTHONPATH": str(root), "HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "home" / "cache")}


@pytest.mark.parametrize("setting", ["NUMBA_NUM_THREADS=0", "NUMBA_THREADING_LAYER=tbb", "unwritable cache"])
def test_kernels_stand_aside_in_one_line_where_numba_cannot_start(setting, tmp_path):
    """No threads allowed, a threading layer that is not installed, or nowhere to keep compiled kernels:
    torch's operators run instead."""
    code = (
        "import torch; from pneumo.cpu import dispatch; dispatch.warm_up(); "
        "from pneumo.model.network import SmallCNN; print(SmallCNN([4, 8])(torch.rand(1, 1, 32, 32)).shape); "
        "import pneumo; print('pneumo from', pneumo.__path__[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    if setting == "unwritable cache":
        env.update(read_only_install(tmp_path))
    else:
        name, value = setting.split("=")
        env[name] = value
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    if setting == "unwritable cache":
        assert f"pneumo from {tmp_path}" in result.stdout  # the copy ran, not the installed package
    if "tbb" in setting and "No threading layer" not in result.stderr and result.returncode == 0:
        pytest.skip("TBB is installed here")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "numba cannot start here" in result.stderr and "torch.Size([1])" in result.stdout
