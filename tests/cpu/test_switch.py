"""The one switch for the CPU kernels (pneumo.cpu) and the one seam the model calls (pneumo.cpu.dispatch)."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ROOT
from pneumo import cpu
from pneumo.core.config import config_hash
from pneumo.core.errors import PneumoError
from pneumo.cpu import dispatch, fused, winograd
from pneumo.model.network import SmallCNN


@pytest.mark.parametrize(
    ("value", "families"),
    [("", {"fused", "winograd"}), ("1", {"fused", "winograd"}), ("off", set()), ("0", set()), ("fused", {"fused"})],
)
def test_the_environment_says_which_families_may_run(monkeypatch, value, families):
    monkeypatch.setenv(cpu.ENVIRONMENT, value)
    assert cpu.environment_setting() == families


def test_a_value_the_environment_cannot_mean_is_the_users_error(monkeypatch):
    monkeypatch.setenv(cpu.ENVIRONMENT, "fused,cuda")
    with pytest.raises(PneumoError, match="PNEUMO_CPU_KERNELS"):
        cpu.environment_setting()


def test_kernels_turns_families_off_for_a_block_and_never_on_against_the_environment(monkeypatch):
    monkeypatch.setenv(cpu.ENVIRONMENT, "winograd")
    monkeypatch.setattr(cpu, "_enabled", None)
    assert not cpu.use_kernels("fused") and cpu.use_kernels("winograd")
    with cpu.kernels(False):
        assert not cpu.use_kernels("winograd")
        with cpu.kernels(True):  # the environment still rules fused out
            assert cpu.use_kernels("winograd") and not cpu.use_kernels("fused")
        assert not cpu.use_kernels("winograd")
    assert cpu.use_kernels("winograd")


def counting(monkeypatch) -> list[str]:
    """Every kernel entry point the dispatch can call, counted."""
    calls = []
    for module, names in (
        (fused, ("stem_block", "inference_stem", "bn_pool_relu")),
        (winograd, ("conv3x3", "conv_pool_relu")),
    ):
        for name in names:
            run = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, run=run, name=name: calls.append(name) or run(*a))
    return calls


def test_off_the_model_runs_torchs_modules_and_on_the_kernels(monkeypatch):
    calls = counting(monkeypatch)
    model = SmallCNN([8, 16], stem_stride=2, dropout=0.0).to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 32, 32)
    with cpu.kernels(False):
        model(x).sum().backward()
        with torch.inference_mode():
            model.eval().folded()(x)
    assert calls == []
    model.train()(x).sum().backward()
    assert calls == ["stem_block", "conv3x3", "bn_pool_relu"]


def test_the_dispatch_declines_what_no_kernel_covers():
    conv, bn, relu, pool = next(SmallCNN([8], stem_stride=1).blocks())
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)  # float64: no kernel takes it
    assert dispatch.block(x, conv.double(), bn.double(), relu, pool) is None


def test_the_config_key_turns_the_kernels_off_for_a_training_run_and_is_no_part_of_the_hash(monkeypatch, tiny_config):
    from pneumo.train.run import train

    calls = counting(monkeypatch)
    cfg = tiny_config(cpu_kernels=False, train={"epochs": 1})
    train(cfg)
    assert calls == []
    assert config_hash(cfg) == config_hash(replace(cfg, cpu_kernels=True))


def test_a_bad_switch_stops_a_command_before_any_work(tmp_path):
    env = {**os.environ, cpu.ENVIRONMENT: "sometimes"}
    out = tmp_path / "scores.csv"
    result = subprocess.run(
        [sys.executable, "-m", "pneumo", "predict", "--out", str(out), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert result.returncode == 2 and "PNEUMO_CPU_KERNELS" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
