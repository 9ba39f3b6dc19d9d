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


def test_public_names_stay_importable_from_lmforge_base_config():
    from lmforge.base import config, config_schema

    for name in config.__all__:
        assert hasattr(config, name), name
    assert config.TrainConfig is config_schema.TrainConfig


def test_non_finite_floats_are_refused_by_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=d", "train.lr=inf", "train.grad_clip=nan", "model.dropout=-inf"])
    assert err.value.problems == ["train.lr: must be a finite number, got 'inf'",
                                  "train.grad_clip: must be a finite number, got 'nan'",
                                  "model.dropout: must be a finite number, got '-inf'"]
    from lmforge.base.config import TrainConfig

    with pytest.raises(ValueError, match="train.max_time: must be a finite number, got inf"):
        TrainConfig(max_time=float("inf"))  # built directly, not read


@pytest.mark.parametrize("name", ["..", ".", "../x", "/abs", "a/../..", "a\\b", " "])
def test_run_name_is_one_folder_name(name: str):
    with pytest.raises(ConfigError, match="run.name: .* must be one folder name"):
        load_config(None, ["data.path=d", f"run.name={name}"])
    assert load_config(None, ["data.path=d", "run.name=lr3e-4.b"]).run_dir == Path("runs/lr3e-4.b")


def test_config_file_must_be_utf8(tmp_path: Path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  path: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: 1 problem.*\n.*line 2: not valid UTF-8"):
        load_config(latin)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffdata:\n  path: caf\u00e9\n".encode("utf-8"))
    assert load_config(bom).data.path == "caf\u00e9"


def test_a_missing_config_file_points_at_lmforge_init(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"lmforge init spam-gpt --out .*configs/spam-gpt.yaml"):
        load_config(tmp_path / "configs" / "spam-gpt.yaml")
    with pytest.raises(FileNotFoundError, match="mine.yaml; write an example with `lmforge init lm`"):
        load_config(tmp_path / "mine.yaml")
