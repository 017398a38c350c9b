"""Loading the kernels and setting their threads (pneumo.cpu.loader)."""

import copy

import numba
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
