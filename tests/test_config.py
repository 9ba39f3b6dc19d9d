from pathlib import Path

import pytest

from lmforge.base.config import ConfigError, config_diff, load_config


def test_defaults_yaml_and_overrides_layer(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  path: d\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.n_layer=3"])
    assert cfg.train.lr == pytest.approx(3e-4)  # override beats YAML
    assert cfg.train.batch_size == 4  # YAML beats default
    assert cfg.train.grad_accum == 1  # default
    assert cfg.model.n_layer == 3


def test_typos_and_bad_values_reported_together_with_nearest_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=d", "train.lerning_rate=3e-4", "train.batch_size=0",
                           "train.max_steps=-5", "train.schedule=cosin", "model.n_head=abc"])
    text = str(err.value)
    assert len(err.value.problems) == 5
    assert "train.lerning_rate: unknown key; did you mean 'lr'?" in text
    assert "train.batch_size: must be a positive integer" in text
    assert "train.max_steps: must be positive" in text
    assert "did you mean 'cosine'?" in text
    assert "model.n_head: expected an integer, got 'abc'" in text


def test_unknown_section_and_missing_data_path():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trian.lr=1"])
    text = str(err.value)
    assert "trian: unknown key; did you mean 'train'?" in text
    assert "data.path: is required" in text


def test_override_syntax_errors_are_named():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["data.path=d", "train.lr"])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_config_diff_lists_changed_leaves():
    a = load_config(None, ["data.path=d"]).to_dict()
    b = load_config(None, ["data.path=d", "train.lr=1e-3"]).to_dict()
    assert config_diff(a, b) == ["train.lr: 0.0006 -> 0.001"]
