"""model.init_from pointed at a transformers folder: refused with the import-hf command that
converts it; the converted checkpoint then starts the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from lmforge.checkpoint import save_checkpoint
from lmforge.commands.interop import export_hf, import_hf
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.train.run import resolve_run


def test_a_transformers_folder_is_refused_with_the_import_command(lm_data: Path, tmp_path: Path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=384, context=32, n_layer=2, n_head=2, n_embd=32)
    ckpt = save_checkpoint(tmp_path / "ckpt", model_state=GPT(config).state_dict(),
                           model_config={"model_type": "gpt", **config.to_dict()},
                           tokenizer_file=lm_data / "tokenizer.json")
    hf_dir = export_hf(ckpt, tmp_path / "gpt2-hf")
    base = tiny_run(lm_data, tmp_path / "runs")
    base["model"] = {"init_from": str(hf_dir)}
    with pytest.raises(ValueError, match=r"gpt2-hf is a Hugging Face transformers folder \(GPT2LMHeadModel\), not an "
                                         r"lmforge checkpoint; convert it once with `lmforge import-hf .*gpt2-hf "
                                         r"--out checkpoints/gpt2-hf`"):
        resolve_run(base, [], None)
    imported = import_hf(hf_dir, tmp_path / "imported")
    base["model"] = {"init_from": str(imported)}
    cfg, start = resolve_run(base, [], None)
    assert start is None and (cfg.model.n_layer, cfg.model.n_embd, cfg.model.context) == (2, 32, 32)
