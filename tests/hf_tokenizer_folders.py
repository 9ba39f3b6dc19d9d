"""Tiny Hugging Face tokenizer folders built offline, in the shapes real models use.

- `llama_folder`: sentencepiece-style BPE in tokenizer.json (Metaspace "▁", byte fallback
  tokens <0x00>..<0xFF>, <unk> <s> </s>), wrapped by transformers' LlamaTokenizerFast with
  add_bos_token, as Llama 2 ships it; a Llama-2-style [INST] chat template.
- `qwen2_folder`: Qwen2's byte-level BPE (NFC, its pre-tokenizer regex, then ByteLevel without
  its own regex), <|endoftext|> <|im_start|> <|im_end|>, wrapped by Qwen2TokenizerFast; a
  ChatML template with Qwen2's default system message.

Both are trained on a few English and Chinese sentences and saved with save_pretrained, so
transformers 5 writes the template as chat_template.jinja.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = ["Hello world, how are you today?", "你好，今天天气怎么样？", "我喜欢吃苹果 and bananas 123.",
          "The quick brown fox 跳过了 the lazy dog!", "Don't you think it's fine? We'll see.",
          "晚安，明天见。", "what do you like to eat"] * 20
MIXED_TEXT = "Hello world! 你好，世界。 I'd like 苹果 and 123 apples.\nNew  line,  二 spaces\t tab 😀 ñ"

QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def llama_folder(root: Path, template: str | None = LLAMA2_CHAT) -> Path:
    from transformers import LlamaTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=220, special_tokens=specials))
    learned = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = trainer_tok.pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    hf = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(root))
    return root


def qwen2_folder(root: Path, template: str | None = CHATML) -> Path:
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token=None, bos_token=None)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(root))
    return root
