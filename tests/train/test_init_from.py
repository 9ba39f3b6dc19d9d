"""The architecture a checkpoint fixes: model.init_from settles it into the config (a shorter
context cut, set fields refused by name), the model a task trains, a resume's architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from lmforge.base.config import Config, DataConfig, ModelConfig, load_config
from lmforge.checkpoint import save_checkpoint
from lmforge.models.heads import classifier_architecture
from lmforge.models.registry import model_from_architecture
from lmforge.train.init_from import (check_resume_architecture, check_task_model, settle_init_from, with_context)
from lmforge.train.run import model_keys_given

GPT = {"model_type": "gpt", "vocab_size": 384, "n_layer": 2, "n_head": 2, "n_embd": 32, "context": 32,
       "activation": "gelu_new"}
BERT = {"model_type": "bert", "vocab_size": 384, "n_layer": 1, "n_head": 2, "n_embd": 32, "context": 24}


@pytest.fixture
def checkpoint(lm_data: Path, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", model_state=model_from_architecture(GPT).state_dict(),
                           model_config=GPT, tokenizer_file=lm_data / "tokenizer.json")


def _cfg(lm_data: Path, tmp_path: Path, checkpoint: Path, **model) -> Config:
    base = tiny_run(lm_data, tmp_path)
    base["model"] = {"init_from": str(checkpoint), **model}
    return load_config(None, base=base)


def test_a_config_built_in_code_gets_the_checkpoint_architecture(lm_data: Path, tmp_path: Path, checkpoint: Path):
    settled = settle_init_from(_cfg(lm_data, tmp_path, checkpoint, dropout=0.1))  # preset "mini" by default only
    m = settled.model
    assert (m.kind, m.preset, m.n_layer, m.n_head, m.n_embd, m.context, m.activation, m.dropout) == \
        ("gpt", None, 2, 2, 32, 32, "gelu_new", 0.1)
    assert settle_init_from(settled) == settled  # settling twice changes nothing
    shorter = settle_init_from(_cfg(lm_data, tmp_path, checkpoint, context=16))
    assert shorter.model.context == 16 and shorter.model.n_embd == 32


def test_fields_set_to_other_values_are_refused_all_at_once(lm_data: Path, tmp_path: Path, checkpoint: Path):
    cfg = _cfg(lm_data, tmp_path, checkpoint, n_embd=64, context=48, activation="relu")
    with pytest.raises(ValueError) as err:
        settle_init_from(cfg)
    message = str(err.value)
    for text in ("model.n_embd=64", "model.context=48 (longer than its 32 learned positions)", "model.activation=relu",
                 "n_embd=32", "activation=gelu_new", "at most context=32"):
        assert text in message, (text, message)
    # the command line knows which keys were given: preset "mini" written out is refused, the default is not
    with pytest.raises(ValueError, match=r"model.preset=mini \(n_layer=4, n_head=4, n_embd=256, context=256\)"):
        settle_init_from(_cfg(lm_data, tmp_path, checkpoint, preset="mini"), {"preset"})
    assert settle_init_from(_cfg(lm_data, tmp_path, checkpoint, preset="tiny"), set()).model.n_embd == 32


def test_model_keys_given_reads_the_yaml_the_dict_and_the_overrides(tmp_path: Path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("model:\n  preset: mini\n  init_from: x\ntrain:\n  lr: 0.1\n")
    assert model_keys_given(yaml_file, ["model.n_embd=64", "train.lr=1"]) == {"preset", "init_from", "n_embd"}
    assert model_keys_given({"model": {"context": 16}}, []) == {"context"}
    assert model_keys_given(Config(model=ModelConfig(kind="bert"), data=DataConfig(path="d")), []) == {"kind"}
    assert model_keys_given(None, ["model.dropout=0.1"]) == {"dropout"}


def test_a_shorter_context_cuts_the_learned_positions_of_gpt_bert_and_a_classifier():
    torch.manual_seed(0)
    for arch in (GPT, BERT, classifier_architecture(BERT, ["a", "b"])):
        model = model_from_architecture(arch)
        state = model.state_dict()
        cut_arch, cut = with_context(arch, state, 8)
        positions = [k for k in state if k.endswith(("wpe.weight", "position_embeddings.weight"))]
        assert len(positions) == 1 and tuple(cut[positions[0]].shape) == (8, 32)
        assert torch.equal(cut[positions[0]], state[positions[0]][:8])
        assert all(cut[k] is state[k] for k in state if k not in positions)
        model_from_architecture(cut_arch).load_state_dict(cut, strict=False)  # the shapes fit
        assert with_context(arch, state, 64) == (arch, state)  # never longer


def test_the_task_names_the_model_it_needs():
    check_task_model("classify", ("gpt", "bert", "classifier"), "classifier")
    with pytest.raises(ValueError, match=r"train.task=lm trains a gpt model, not model.kind=bert; .*train.task=.*mlm"):
        check_task_model("lm", ("gpt",), "bert")
    arch = classifier_architecture(GPT, ["ham", "spam"])
    with pytest.raises(ValueError, match=r"is a classifier checkpoint \(a gpt backbone with a head for labels "
                                         r"ham, spam\); train.task=mlm needs a bert checkpoint"):
        check_task_model("mlm", ("bert",), "classifier", "ckpt", arch)


def test_a_resume_names_every_changed_architecture_field_but_dropout():
    saved = classifier_architecture(dict(GPT, dropout=0.0), ["ham", "spam"])
    now = classifier_architecture(dict(GPT, n_embd=64, dropout=0.1), ["ham", "spam", "eggs"], dropout=0.1)
    with pytest.raises(ValueError) as err:
        check_resume_architecture(now, saved, Path("run/checkpoints/last"))
    message = str(err.value)
    assert "model.n_embd: 32 in the checkpoint, 64 now" in message and "num_labels: 2 in the checkpoint, 3" in message
    assert "dropout" not in message and "model.init_from=run/checkpoints/last" in message
    check_resume_architecture(dict(GPT, dropout=0.2), dict(GPT, dropout=0.0), Path("x"))  # dropout may change
