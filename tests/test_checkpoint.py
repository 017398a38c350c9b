import os

import pytest
import torch

from pneumo.checkpoint import atomic_write, load_checkpoint, model_from_checkpoint, save_checkpoint
from pneumo.config import to_dict
from pneumo.errors import PneumoError
from pneumo.models import build_model


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_atomic_write_gives_the_permissions_of_a_plain_new_file(tmp_path):
    # Temp files are created 0600; a checkpoint on a shared machine must be readable as usual.
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "shared.pt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o640


def test_round_trip(tmp_path, tiny_config):
    cfg = tiny_config()
    model = build_model(cfg.model)
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "config": to_dict(cfg), "threshold": 0.4})
    ckpt = load_checkpoint(tmp_path / "m.pt")
    loaded = model_from_checkpoint(ckpt)
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_bad_checkpoints(tmp_path, tiny_config):
    with pytest.raises(PneumoError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(PneumoError, match="not a readable checkpoint \\(not a file saved by torch\\)") as err:
        load_checkpoint(tmp_path / "text.pt")
    assert "weights_only" not in str(err.value)  # no advice to load untrusted files unsafely
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(PneumoError, match="not a pneumo checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    # A checkpoint whose weights belong to another architecture.
    cfg = tiny_config()
    other = build_model(tiny_config(model={"channels": [4, 4]}).model)
    save_checkpoint(tmp_path / "mixed.pt", {"model": other.state_dict(), "config": to_dict(cfg)})
    with pytest.raises(PneumoError, match="does not match the model it describes"):
        model_from_checkpoint(load_checkpoint(tmp_path / "mixed.pt"), tmp_path / "mixed.pt")
