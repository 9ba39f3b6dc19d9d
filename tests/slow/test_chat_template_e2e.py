"""End to end with a chat template: a tiny random Qwen2 folder (ChatML template) imported,
messages JSONL prepared with its template, fine-tuned a few steps on the assistant's turns,
then chatted with through `lmforge chat`, which renders the template and stops at <|im_end|>."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_tokenizer_folders import CHATML, qwen2_folder

REPLIES = {"你好": "你好！今天天气怎么样？", "what do you like to eat": "我喜欢吃苹果 and bananas"}


@pytest.mark.slow
def test_import_prepare_train_chat_with_a_template(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    import lmforge
    from lmforge.commands.interop import import_hf
    from lmforge.data.prepare_dialogue import prepare_dialogue

    folder = qwen2_folder(tmp_path / "qwen2")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    config = transformers.Qwen2Config(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True, eos_token_id=end)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    checkpoint = import_hf(folder, tmp_path / "ckpt")

    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": REPLIES["你好"]},
                    {"role": "user", "content": "what do you like to eat"},
                    {"role": "assistant", "content": REPLIES["what do you like to eat"]}]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n" for _ in range(40)),
                    encoding="utf-8")
    meta = prepare_dialogue([data], checkpoint, tmp_path / "data", show_progress=False)
    assert meta["dialogue"]["format"] == "chat_template"

    result = lmforge.train_model({
        "model": {"init_from": str(checkpoint)}, "data": {"path": str(tmp_path / "data")},
        "train": {"task": "dialogue", "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "max_steps": 40,
                  "eval_every": 40, "eval_batches": 1, "sample_tokens": 0},
        "run": {"out_dir": str(tmp_path / "runs"), "name": "qwen-chat"}}, show_progress=False)
    trained = result.run_dir / "checkpoints" / "last"
    kept = json.loads((trained / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert kept["chat_template"] == CHATML  # the template travels: import -> data -> run checkpoints

    chat = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(result.run_dir), "--device", "cpu",
                           "--temperature", "0", "--max-reply-tokens", "24"],
                          input="你好\nwhat do you like to eat\n", capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.splitlines() == [REPLIES["你好"], REPLIES["what do you like to eat"]]
