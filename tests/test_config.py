"""Experiment configs: every bad config fails before any work, naming the key and value."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from snr_dist.cli import main
from snr_dist.experiments.config import ConfigError, apply_overrides, load_config

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
BASE = yaml.safe_load(QUICKSTART.read_text())


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    apply_overrides(raw, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    return raw


def test_quickstart_config_is_valid():
    cfg = load_config(str(QUICKSTART))
    assert [o.name for o in cfg.optimizers] == ["AdamW", "SNRAdamW"]
    assert cfg.data.label_noise == 0.4


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("train.epochs", 0, ["train.epochs", "0", "greater than or equal to 1"]),
        ("train.epochs", "ten", ["train.epochs", "'ten'", "valid integer"]),
        ("train.batch_size", -4, ["train.batch_size", "-4"]),
        ("train.epohcs", 3, ["train.epohcs", "unknown key", "epochs"]),
        ("data.label_noise", 1.5, ["data.label_noise", "1.5", "less than 1"]),
        ("data.dataset", "mnist", ["data.dataset", "'mnist'", "'digits'"]),
        ("model.hidden", [64, 0], ["model.hidden", "hidden width must be >= 1"]),
        ("model.activation", "swish", ["model.activation", "'swish'", "'relu'"]),
        ("optimizers.1.lr", -1.0, ["optimizers.1.lr", "-1.0", "greater than 0"]),
        ("optimizers.1.type", "sgd", ["optimizers.1.type", "'sgd'", "'adamw' or 'snr_adamw'"]),
        ("optimizers.1.snr.tau", 0, ["optimizers.1.snr.tau", "Invalid tau", "(0.0, inf)"]),
        ("optimizers.1.snr.gate", "soft", ["optimizers.1.snr.gate", "'wiener'", "'paper'"]),
        ("optimizers.1.snr.mode", "lowrank", ["optimizers.1.snr.mode", "'subspace'"]),
        ("optimizers.1.snr.rank", 0, ["optimizers.1.snr.rank", "Invalid rank", ">= 1"]),
        ("optimizers.1.snr.snr_beta", 1.0, ["optimizers.1.snr.snr_beta", "[0.0, 1.0)"]),
        ("optimizers.1.snr.gaet", "wiener", ["optimizers.1.snr.gaet", "unknown key", "gate"]),
        ("optimizers.0.snr", {"tau": 1.0}, ["optimizers.0", "only to type 'snr_adamw'"]),
        ("optimizers.1.name", "AdamW", ["names must be unique", "AdamW"]),
        ("optimizers.1.snr.estimator", "cross_sample", ["cross_sample", "train.microbatches"]),
        ("name", "has space", ["name", "'has space'", "pattern"]),
        # what the optimizers would refuse only after other runs had trained
        ("optimizers.1.betas", [0.9, 1.5], ["optimizers.1", "Invalid betas[1]: 1.5"]),
        ("optimizers.0.betas", [-0.1, 0.99], ["optimizers.0", "Invalid betas[0]: -0.1"]),
        ("optimizers.1.snr.snr_beta2", 0.5, ["optimizers.1", "snr_beta2", "set betas[1]"]),
        # names become folder names inside the output directory
        ("optimizers.0.name", "../../escaped", ["optimizers.0.name", "must not contain '/'"]),
        ("optimizers.0.name", "..", ["optimizers.0.name", "'.' or '..'"]),
        ("train.seeds", [0, 0], ["train.seeds", "seeds must be distinct"]),
    ],
)
def test_bad_config_names_key_and_value(path, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(raw=_with(path, value))
    msg = str(e.value)
    for piece in expected:
        assert piece in msg, (piece, msg)


def test_missing_required_and_wrong_top_level():
    raw = copy.deepcopy(BASE)
    del raw["optimizers"]
    with pytest.raises(ConfigError, match="optimizers: required key is missing"):
        load_config(raw=raw)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(raw=[1, 2])


def test_all_problems_reported_at_once():
    raw = _with("train.epochs", 0)
    apply_overrides(raw, ["optimizers.1.snr.tau=-1", "data.foo=1"])
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    for key in ("train.epochs", "optimizers.1.snr.tau", "data.foo"):
        assert key in msg


def test_set_overrides_parse_values_and_reject_bad_paths():
    cfg = load_config(
        str(QUICKSTART),
        ["train.epochs=7", "optimizers.1.snr.gate=paper", "train.seeds=[3, 4]"],
    )
    assert cfg.train.epochs == 7 and cfg.optimizers[1].snr.gate == "paper"
    assert cfg.train.seeds == [3, 4]
    for bad, words in [
        ("train.epochs", "KEY=VALUE"),
        ("optimizers.9.lr=1", "not an index"),
        ("train.epochs.x=1", "is a value, not a section"),
        (".a=1", "invalid key"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(str(QUICKSTART), [bad])


def test_cli_reports_config_errors_before_work(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--config",
            str(QUICKSTART),
            "--set",
            "train.epochs=-1",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.epochs = -1" in err
    assert not any(tmp_path.iterdir())  # nothing was started
    rc = main(["train", "--config", str(tmp_path / "nope.yaml")])
    assert rc == 2 and "config file not found" in capsys.readouterr().err
