import os

import pytest
import torch

from pneumo.core.errors import CheckpointError
from pneumo.model.checkpoint import TrainedModel, read_checkpoint, save_checkpoint
from pneumo.model.network import build_model


def saved(tmp_path, tiny_config, name="m.pt", **changes) -> tuple:
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    trained = TrainedModel(config=cfg, members=[model.state_dict()], threshold=0.4, threshold_method="youden")
    payload = {**trained.payload(), **changes}
    save_checkpoint(tmp_path / name, payload)
    return tmp_path / name, model


def test_round_trip(tmp_path, tiny_config):
    path, model = saved(tmp_path, tiny_config)
    loaded = TrainedModel.load(path)
    assert loaded.threshold == 0.4 and loaded.config == tiny_config() and len(loaded.model_id) == 16
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(loaded.network()(x), model(x))


def test_overrides_adapt_the_config_to_this_machine(tmp_path, tiny_config):
    path, _ = saved(tmp_path, tiny_config)
    assert TrainedModel.load(path, ["device=cpu", "train.eval_batch_size=7"]).config.train.eval_batch_size == 7


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TrainedModel.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint \\(not a file saved by torch\\)") as err:
        TrainedModel.load(tmp_path / "text.pt")
    assert "weights_only" not in str(err.value)  # no advice to load untrusted files unsafely
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pneumo checkpoint"):
        TrainedModel.load(tmp_path / "other.pt")
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="not a regular file"):
        TrainedModel.load(tmp_path / "fifo.pt")  # refused without opening it: reading a FIFO would block


def test_weights_of_another_architecture(tmp_path, tiny_config):
    other = build_model(tiny_config(model={"channels": [4, 4]}).model)
    path, _ = saved(tmp_path, tiny_config, members=[other.state_dict()])
    with pytest.raises(CheckpointError, match="does not match the model it describes"):
        TrainedModel.load(path)


@pytest.mark.parametrize("threshold", [None, "abc", float("nan"), 1.5, 0.0, 1.0])
def test_unusable_thresholds(tmp_path, tiny_config, threshold):
    path, _ = saved(tmp_path, tiny_config, threshold=threshold)
    with pytest.raises(CheckpointError, match="has no usable threshold"):
        TrainedModel.load(path)


def test_damaged_weights_are_caught_by_the_checksum(tmp_path, tiny_config):
    path, _ = saved(tmp_path, tiny_config)
    data = bytearray(path.read_bytes())
    # Overwrite 64 bytes inside the stored tensors (the zip stays valid: its entries are stored, not compressed).
    raw = read_checkpoint(path)
    target = raw["members"][0]["features.0.weight"].numpy().tobytes()[:16]
    at = bytes(data).find(target)
    assert at > 0
    data[at : at + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        TrainedModel.load(path)


def test_non_finite_weights_are_refused(tmp_path, tiny_config):
    model = build_model(tiny_config().model)
    state = model.state_dict()
    state["head.3.weight"][0, 0] = float("nan")
    path, _ = saved(tmp_path, tiny_config, members=[state])
    with pytest.raises(CheckpointError, match="non-finite weights"):
        TrainedModel.load(path)


@pytest.fixture
def trained_on_cuda(tmp_path, trained_checkpoint):
    """The tiny trained model as a GPU run saves it: its config says device: cuda."""
    raw = read_checkpoint(trained_checkpoint)
    raw["config"]["device"] = "cuda"
    path = tmp_path / "cuda.pt"
    save_checkpoint(path, {k: v for k, v in raw.items() if k not in ("format", "weights_sha256")})
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="the point is a machine without CUDA")
def test_where_a_model_was_trained_never_decides_where_it_runs(tmp_path, trained_on_cuda):
    from conftest import assert_clean_failure, call
    from pneumo.cli import calibrate_main, evaluate_main, predict_main
    from pneumo.data.synthetic import write_folder

    model = TrainedModel.load(trained_on_cuda)
    assert model.config.device == "cuda" and model.device == "auto"  # kept as provenance, not obeyed
    write_folder(tmp_path / "site", {"test": 40}, size=32)
    site = tmp_path / "site" / "test"
    for result in (
        call(evaluate_main, "--checkpoint", trained_on_cuda, "--out", tmp_path / "eval", "--bootstrap", "0"),
        call(predict_main, "--checkpoint", trained_on_cuda, "--out", tmp_path / "scores.csv", site),
        call(calibrate_main, "--checkpoint", trained_on_cuda, "--out", tmp_path / "site.pt", site),
    ):
        assert result.returncode == 0, result.stderr
    asked = call(evaluate_main, "--checkpoint", trained_on_cuda, "--out", tmp_path / "e2", "--set", "device=cuda")
    assert_clean_failure(asked, "cuda")
    assert not (tmp_path / "e2").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("calibration", {"method": "platt", "scale": -1.0, "bias": 0.0}),  # inverts every prediction
        ("calibration", {"method": "platt", "scale": 0.0, "bias": 0.0}),  # one answer for every image
        ("calibration", {"method": "platt", "scale": float("inf"), "bias": 0.0}),
        ("calibration", {"method": "platt", "scale": float("nan"), "bias": 0.0}),
        ("calibration", {"method": "platt", "scale": 1.0, "bias": float("inf")}),
        ("calibration", {"method": "platt", "scale": "1.0", "bias": 0.0}),
        ("calibration", {"method": "magic", "scale": 1.0, "bias": 0.0}),
        ("val_metrics", "auc"),
        ("provenance", "nowhere"),
    ],
)
def test_every_number_and_field_is_checked_against_its_meaning(tmp_path, tiny_config, field, value):
    """A checkpoint whose calibration or metadata make no sense is unusable (exit 3), never a traceback
    and never silently inverted or constant."""
    path, _ = saved(tmp_path, tiny_config, **{field: value})
    with pytest.raises(CheckpointError, match=str(path)):
        TrainedModel.load(path)


@pytest.mark.parametrize("damage", ["negative variance", "complex"])
def test_weights_that_are_no_real_network_are_refused(tmp_path, tiny_config, damage):
    cfg = tiny_config()
    state = build_model(cfg.model).state_dict()
    if damage == "negative variance":
        state["features.1.running_var"][0] = -1.0
    else:
        state["head.3.weight"] = state["head.3.weight"].to(torch.complex64)
    trained = TrainedModel(config=cfg, members=[state], threshold=0.4, threshold_method="youden")
    save_checkpoint(tmp_path / "m.pt", trained.payload())
    with pytest.raises(CheckpointError, match="negative BatchNorm variance|not real numbers"):
        TrainedModel.load(tmp_path / "m.pt")


def test_a_tensor_of_repeated_strides_is_refused_before_it_is_read(tmp_path, tiny_config):
    """A few stored numbers shown as 1.2 billion by stride 0: refused from its shape and strides, before
    the checksum or any check walks it (which would take gigabytes)."""
    cfg = tiny_config()
    trained = TrainedModel(
        config=cfg, members=[build_model(cfg.model).state_dict()], threshold=0.4, threshold_method="x"
    )
    save_checkpoint(tmp_path / "m.pt", trained.payload())
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["members"][0]["head.3.weight"] = torch.zeros(1).expand(40_000, 30_000)
    del raw["weights_sha256"]
    torch.save(raw, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"not a plain array of weights \(head.3.weight: shape \(40000, 30000\)"):
        read_checkpoint(tmp_path / "m.pt")
