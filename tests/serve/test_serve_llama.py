"""An imported Llama-class model (Qwen2, with its ChatML template) behind the server: the prompt is
the template's rendering as transformers makes it, the greedy reply is transformers' generate
stopped at <|im_end|>, and concurrent requests decode in shared batches."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import torch

from hf_tokenizer_folders import qwen2_folder
from lmforge.commands.interop import import_hf
from lmforge.serve.served import load_served
from lmforge.serve.server import ServerThread
from lmforge.serve.state import ServerState

transformers = pytest.importorskip("transformers")
QUESTIONS = ["Hello world, how are you today?", "what do you like to eat", "你好，今天天气怎么样？", "晚安"]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    folder = qwen2_folder(root / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # peaked logits: varied greedy replies
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return import_hf(folder, root / "ckpt"), model, tokenizer


def test_chat_with_an_imported_qwen2_follows_its_template(qwen2):
    ckpt, hf, tokenizer = qwen2
    served = load_served(f"qwen={ckpt}", "cpu", max_batch=8)
    assert served.chat.name == "template"
    state = ServerState(models={"qwen": served}, max_tokens=40)
    with ServerThread(state) as url, openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
        def ask(question: str):
            return client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": question}],
                                                  temperature=0, max_tokens=20)

        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
            answers = list(pool.map(ask, QUESTIONS))
    for question, answer in zip(QUESTIONS, answers):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=0)
        reply = out[0, len(prompt):].tolist()
        ended = bool(reply) and reply[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert answer.usage.prompt_tokens == len(prompt)
        assert answer.usage.completion_tokens == len(reply) - ended
        assert answer.choices[0].message.content == tokenizer.decode(reply, skip_special_tokens=True)
        assert answer.choices[0].finish_reason == ("stop" if ended else "length")
