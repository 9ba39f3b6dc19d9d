"""`lmforge eval --text`: sliding-window perplexity and bits per byte of raw text, equal to what
transformers computes on the exported model with the windows of its perplexity guide."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.commands.evaluate import text_eval_command
from lmforge.commands.interop import export_hf
from lmforge.inference.perplexity import windows
from lmforge.models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n\n") * 4


@pytest.fixture(scope="module")
def run(lm_data: Path, tmp_path_factory) -> tuple[Path, Path, object]:
    """A tiny GPT checkpoint (context 32) with weights scaled up so its predictions are far from
    uniform (scoring the wrong tokens would show), its transformers export and that model."""
    out = tmp_path_factory.mktemp("ppl")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=384, context=32, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    ckpt = save_checkpoint(out / "ckpt", model_state=model.state_dict(),
                           model_config={"model_type": "gpt", **config.to_dict()},
                           tokenizer_file=lm_data / "tokenizer.json")
    hf_dir = export_hf(ckpt, out / "hf")
    return ckpt, hf_dir, transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def guide_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int, float]:
    """transformers' perplexity guide, its windows and labels as written; returns (total NLL of
    the tokens the model scores, their count, the guide's own avg_nll)."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, exact_sum, exact_count, prev_end_loc = 0.0, 0, 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        scored = int((target_ids[:, 1:] != -100).sum())  # labels the model scores after its shift
        exact_sum += loss.item() * scored
        exact_count += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return exact_sum, exact_count, nll_sum / n_tokens


@pytest.mark.parametrize("stride", [32, 13])
def test_eval_text_equals_transformers_on_the_exported_model(run, tmp_path, stride):
    run_dir, hf_dir, hf_model = run
    text_file = tmp_path / "play.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    result = text_eval_command(io.StringIO(), run_dir, [text_file], stride=stride, device="cpu")
    assert abs(result["mean_nll"] - math.log(384)) > 0.3  # far from uniform predictions
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = hf_tok(TEXT, return_tensors="pt").input_ids
    assert result["tokens"] == ids.size(1) > 3 * 32  # several windows
    nll, count, guide_avg = guide_nll(hf_model, ids, hf_model.config.n_positions, stride)
    assert result["scored"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-4)
    if stride == 32:  # disjoint windows: the guide's weighting is the exact mean
        assert result["perplexity"] == pytest.approx(math.exp(guide_avg), rel=1e-4)
        assert count == ids.size(1) - math.ceil(ids.size(1) / 32)  # each window's first token unscored
    else:  # overlapping windows: every token but the first is scored once
        assert count == ids.size(1) - 1


def test_windows_score_every_token_once():
    spans = windows(100, 32, 10)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, 100))
    assert all(end - begin <= 32 and first - begin >= 1 for begin, end, first in spans)
    with pytest.raises(ValueError, match=r"--stride must be between 1 and the model's context \(32\), got 40"):
        windows(100, 32, 40)


def test_files_table_json_and_parquet(run, tmp_path, capsys):
    run_dir, _, _ = run
    txt = tmp_path / "a.txt"
    txt.write_text(TEXT, encoding="utf-8")
    docs = [block + "\n" for block in TEXT.split("\n\n") if block]
    pq.write_table(pa.table({"text": docs[:4]}), tmp_path / "b.parquet")
    joined = tmp_path / "b.txt"
    joined.write_text("\n\n".join(docs[:4]), encoding="utf-8")  # the documents joined by a blank line
    assert main(["eval", str(run_dir), "--text", str(txt), str(tmp_path / "b.parquet"), "--stride", "16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    by_file = {Path(t["text"]).name: t for t in result["texts"]}
    assert result["tokens"] == sum(t["tokens"] for t in result["texts"])
    assert result["nll"] == pytest.approx(sum(t["nll"] for t in result["texts"]))
    alone = text_eval_command(io.StringIO(), run_dir, [joined], stride=16, device="cpu")
    assert by_file["b.parquet"]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-9)
    assert main(["eval", str(run_dir), "--text", str(txt), str(joined), "--stride", "16"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "bits/byte" in table and "total" in table and "a.txt" in table


def test_eval_text_refuses_bert_and_a_stride_past_the_context(run, tmp_path, capsys):
    run_dir, _, _ = run
    (tmp_path / "a.txt").write_text(TEXT)
    assert main(["eval", str(run_dir), "--text", str(tmp_path / "a.txt"), "--stride", "33"]) == 2
    assert "--stride must be between 1 and the model's context (32), got 33" in capsys.readouterr().err
    assert main(["eval", str(run_dir)]) == 2
    assert "give --data DIR (a prepared folder) or --text FILE..." in capsys.readouterr().err
    from lmforge.base.tokenizer import train_tokenizer
    from lmforge.models.bert import Bert, BertConfig
    tok = train_tokenizer([tmp_path / "a.txt"], kind="wordpiece", vocab_size=120, out_dir=tmp_path / "wp",
                          show_progress=False)
    config = BertConfig(vocab_size=120, n_layer=1, n_head=2, n_embd=16, context=32)
    ckpt = save_checkpoint(tmp_path / "bert", model_state=Bert(config).state_dict(),
                           model_config={"model_type": "bert", **config.to_dict()}, tokenizer_file=tok)
    assert main(["eval", str(ckpt), "--text", str(tmp_path / "a.txt")]) == 2
    assert "a BERT checkpoint is a masked language model, not a causal one" in capsys.readouterr().err


def test_a_llama_class_checkpoint_with_a_bos_equals_transformers(tmp_path):
    """An imported LlamaForCausalLM whose tokenizer adds <s>: the BOS is the first id, as AutoTokenizer gives."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from lmforge.commands.interop import import_hf
    words = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(words, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.mul_(6.0)  # far from uniform predictions
    hf_model.save_pretrained(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "llama")
    text = " ".join(words[:14])
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = text_eval_command(io.StringIO(), ckpt, [tmp_path / "t.txt"], stride=24, device="cpu")
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1 and result["tokens"] == ids.size(1) > 2 * 64
    nll, count, _ = guide_nll(hf_model, ids, 64, 24)
    assert result["scored"] == count == ids.size(1) - 1
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_the_library_call_gives_the_command_s_numbers(run, tmp_path):
    import lmforge
    ckpt, _, _ = run
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    by_command = text_eval_command(io.StringIO(), ckpt, [tmp_path / "a.txt"], stride=16, device="cpu")
    by_library = lmforge.load(ckpt, device="cpu").perplexity(tmp_path / "a.txt", stride=16)
    assert by_library == by_command and by_library["texts"][0]["scored"] == by_library["scored"]


def test_a_long_text_is_encoded_in_pieces_with_the_whole_text_s_ids(lm_data, monkeypatch):
    import numpy as np
    import lmforge.inference.perplexity as perplexity
    from lmforge.base.tokenizer import load_tokenizer
    from lmforge.commands.quickstart import bundled_corpus
    tok = load_tokenizer(lm_data / "tokenizer.json")
    text = bundled_corpus().read_text(encoding="utf-8")[:60_000] + "\n\n  indented\n\n\nlast words  \n"
    monkeypatch.setattr(perplexity, "_PIECE_CHARS", 500)  # a hundred cuts, after blank lines too
    assert np.array_equal(perplexity.encode_text(tok, text), tok.encode(text, add_special_tokens=False).ids)
