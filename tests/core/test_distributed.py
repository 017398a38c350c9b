"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, history, tiny_raw
from pneumo.core import distributed
from pneumo.core.config import from_dict
from pneumo.core.errors import PneumoError
from pneumo.train.run import train

# BatchNorm statistics are per process on CPUs (torch's SyncBatchNorm is GPU-only), so the two runs
# differ slightly; the tolerance is several times that difference and far below a real mismatch.
LOSS_TOLERANCE = 0.02


def torchrun(*args, nproc=2):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "scripts" / "train.py"),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    # What the processes themselves said, for the assertion messages (torchrun's own summary comes last).
    result.ranks = "\n".join(
        line for line in result.stderr.splitlines() if line.startswith("[rank") or "Error" in line
    )[-4000:]
    return result


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    raw = tiny_raw(
        tmp_path / "single",
        data={"synthetic": {"n_train": 128, "n_val": 64, "n_test": 16}},
        model={"dropout": 0.0},
        train={"epochs": 3, "batch_size": 16},
    )
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    train(from_dict(raw))

    result = torchrun(
        "--config", tmp_path / "exp.yaml", "--set", f"output.dir={tmp_path / 'multi'}", "--set", "train.epochs=2"
    )
    assert result.returncode == 0, result.ranks
    # Resume under torchrun too: every process reads last.pt and carries on.
    result = torchrun("--config", tmp_path / "exp.yaml", "--set", f"output.dir={tmp_path / 'multi'}", "--resume")
    assert result.returncode == 0, result.ranks
    assert "resuming" in result.stderr

    single, multi = history(tmp_path / "single"), history(tmp_path / "multi")
    assert [r["epoch"] for r in multi] == [1, 2, 3]
    for s, m in zip(single[:2], multi[:2], strict=True):  # the first two epochs ran the same schedule
        assert abs(s["train_loss"] - m["train_loss"]) < LOSS_TOLERANCE
        assert abs(s["val_loss"] - m["val_loss"]) < LOSS_TOLERANCE
        assert s["train_loss"] != m["train_loss"]  # two processes did run, with their own BatchNorm statistics
    # Only rank 0 wrote: one log line per epoch, one set of files.
    log = (tmp_path / "multi" / "train.log").read_text()
    assert log.count("epoch 1/2: train loss") == 1
    assert sorted(p.name for p in (tmp_path / "multi").iterdir() if not p.name.startswith(".")) == [
        "best.pt",
        "config.yaml",
        "curves.png",
        "last.pt",
        "metrics.jsonl",
        "split.json",
        "train.log",
    ]


def test_global_batch_must_divide_among_processes(tmp_path):
    raw = tiny_raw(tmp_path / "run", train={"batch_size": 15})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    result = torchrun("--config", tmp_path / "exp.yaml")
    assert result.returncode != 0
    assert "train.batch_size (15) must be a multiple of the number of processes (2)" in result.stderr


class HandedOver(Exception):
    """Raised by the stand-in collectives once they have checked what they were handed."""


def test_every_collective_is_handed_tensors_on_the_processs_own_device(monkeypatch):
    """NCCL takes CUDA tensors only: a collective handed a tensor on another device than the process's
    fails there ("No backend type associated with device type cpu"). gloo on CPUs cannot show it, so
    the collectives are stood in for by a check, with the process's device a non-CPU one (meta)."""
    import pytest
    import torch
    import torch.distributed as dist

    from pneumo.core.distributed import Context

    ctx = Context(rank=0, world=2, device=torch.device("meta"))

    def collective(tensor, *args, **kwargs):
        assert tensor.device == ctx.device, f"a collective was handed a tensor on {tensor.device}"
        raise HandedOver

    monkeypatch.setattr(dist, "broadcast", collective)
    monkeypatch.setattr(dist, "all_reduce", collective)
    with pytest.raises(HandedOver):
        ctx.agree(True)
    with pytest.raises(HandedOver):
        ctx.sum(torch.zeros(2))  # a total built on the host, as a careless caller would


@pytest.mark.parametrize(
    "env, phrase",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two is not a number of processes"),
    ],
)
def test_a_leftover_world_size_is_one_sentence(monkeypatch, env, phrase):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PneumoError, match=phrase), distributed.session("cpu"):
        pass
