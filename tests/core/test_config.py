import os
from pathlib import Path

import pytest
import yaml

from pneumo.core.config import Config, ConfigError, apply_override, from_dict, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["quickstart.yaml", "kermany.yaml", "pneumoniamnist.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)
    assert cfg.model.channels and cfg.train.epochs >= 1


def test_values_are_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  lr: 1e-3\n  epochs: 3\n  pos_weight: auto\nmodel:\n  channels: [4, 8]\n")
    )
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.train.epochs == 3 and cfg.train.pos_weight == "auto"
    assert cfg.model.channels == [4, 8]
    assert cfg.data.image_size == 224  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  epoch: 3\n", "unknown key 'train.epoch'"),
        ("trian:\n  epochs: 3\n", "unknown key 'trian'"),
        ("train:\n  epochs: three\n", "train.epochs: expected an integer"),
        ("train:\n  epochs: 0\n", "train.epochs: 0 is out of range"),
        ("train:\n  epochs: 2.5\n", "train.epochs: expected an integer"),
        ("device: gpu\n", "device: expected one of 'auto', 'cpu', 'cuda'"),
        ("augment:\n  enabled: 'yes'\n", "augment.enabled: expected true or false"),
        ("model:\n  channels: []\n", "model.channels: expected a non-empty list"),
        ("model:\n  channels: [8, -1]\n", "model.channels[1]: -1 is out of range"),
        ("train:\n  lr: .nan\n", "train.lr: expected a number"),
        ("train:\n  pos_weight: lots\n", "train.pos_weight: expected a number in [0, 1000] or one of 'auto' or null"),
        ("data: 3\n", "data: expected a section"),
        ("data:\n  format: folder\n", "data.root: must name the data"),
        (
            "data:\n  image_size: 32\nmodel:\n  channels: [8, 8, 8, 8, 8]\n",
            "data.image_size: 32 is smaller than the model's total downsampling (64",
        ),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert key in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    cfg = load_config(
        path, ["train.epochs=7", "data.root=/data/x", "device=cpu", "seed=5", "output.dir=out", "train.batch_size=8"]
    )
    assert (cfg.train.epochs, cfg.data.root, cfg.device, cfg.seed, cfg.output.dir, cfg.train.batch_size) == (
        7,
        "/data/x",
        "cpu",
        5,
        "out",
        8,
    )
    assert load_config(path, ["train.pos_weight=null"]).train.pos_weight is None
    assert load_config(path, ["model.channels=[4, 8]"]).model.channels == [4, 8]


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.epochz=3", "--set train.epochz=3: unknown key 'train.epochz'"),
        ("train.epochs=-1", "--set train.epochs=-1: train.epochs: -1 is out of range"),
        ("train.epochs", "--set train.epochs: expected section.key=value"),
        ("seed.x=1", "--set seed.x=1: seed: expected an integer"),
        ("train.epochs.x=1", "--set train.epochs.x=1: epochs is not a section"),
    ],
)
def test_bad_overrides_name_the_override(tmp_path, item, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  epochs: 3\n"), [item])
    assert message in str(err.value)


def test_override_does_not_touch_the_original():
    raw = {"train": {"epochs": 3}}
    assert apply_override(raw, "train.epochs=4") == {"train": {"epochs": 4}}
    assert raw == {"train": {"epochs": 3}}


def test_round_trip_through_yaml():
    cfg = load_config(CONFIGS / "kermany.yaml")
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: 3\ntrain:\n  lr: 0.1\n", "the key 'train' appears twice"),
        ("a: &x [1, 2]\nb: *x\n", "aliases (*name) are not allowed"),
        ("data:\n  synthetic:\n    n_train: 1000000000000\n", "data.synthetic.n_train: 1000000000000 is out of range"),
    ],
)
def test_hostile_files_are_refused_before_any_work(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_an_alias_bomb_is_refused_at_its_first_alias(tmp_path):
    # About 300 bytes that would expand to 9^9 (387 million) list items.
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    bomb = "\n".join(lines) + "\n"
    with pytest.raises(ConfigError, match="aliases"):
        load_config(write(tmp_path, f"seed: 0\n{bomb}"))
    with pytest.raises(ConfigError, match="aliases"):
        load_config(write(tmp_path, "seed: 0\n"), ["train.epochs=[&a [1, 1], *a, *a]"])


@pytest.mark.parametrize("item", ["model.channels=[16,32", "seed=*a", "train.lr={"])
def test_yaml_errors_in_overrides_name_the_override(tmp_path, item):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "seed: 0\n"), [item])
    assert str(err.value).startswith(f"--set {item}: not valid YAML")


def test_long_values_are_cut_short_in_messages(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"seed: '{'x' * 10000}'\n"))
    assert len(str(err.value)) < 300


def test_a_fifo_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "exp.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path / "exp.yaml")
