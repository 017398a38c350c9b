"""Members trained apart and assembled give the model that pneumo-train hands over itself."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_failure, run_script, write_config
from pneumo.core.errors import PneumoError
from pneumo.model.checkpoint import TrainedModel
from pneumo.train.assemble import check_members
from pneumo.train.run import member_config, train


def test_members_trained_apart_assemble_into_the_same_model(tmp_path, tiny_config):
    cfg = tiny_config(train={"members": 2, "epochs": 1})
    train(cfg)
    together = TrainedModel.load(Path(cfg.output.dir) / "best.pt")
    apart = []
    for k in range(2):  # as two machines would: each member on its own, in another directory
        member = member_config(cfg, k)
        member = replace(member, output=replace(member.output, dir=str(tmp_path / f"apart-{k}")))
        train(member)
        apart.append(tmp_path / f"apart-{k}" / "best.pt")
    from conftest import tiny_raw

    config = write_config(tmp_path / "ensemble.yaml", tiny_raw(tmp_path / "run", train={"members": 2, "epochs": 1}))
    result = run_script("assemble.py", "--config", config, "--out", tmp_path / "assembled.pt", *apart)
    assert result.returncode == 0, result.stderr
    assembled = TrainedModel.load(tmp_path / "assembled.pt")
    assert assembled.threshold == together.threshold and assembled.calibration == together.calibration
    for a, b in zip(assembled.members, together.members, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A member of another recipe, or the wrong seeds, is refused.
    with pytest.raises(PneumoError, match="seeds"):
        check_members(cfg, [apart[0], apart[0]])
    other = tiny_config(train={"members": 2, "epochs": 1, "lr": 0.5})
    with pytest.raises(PneumoError, match="another recipe .*train.lr"):
        check_members(other, apart)
    assert_clean_failure(
        run_script("assemble.py", "--config", config, "--out", tmp_path / "x.pt", apart[0]), "train.members: 2"
    )
