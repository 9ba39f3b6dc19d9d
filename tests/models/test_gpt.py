"""GPT architecture: masks, KV cache, parameter counts, config validation, equality with transformers."""

import pytest
import torch

from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig, add_projection, flops_per_token, num_params

VOCAB = 97


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("tiny", vocab_size=VOCAB, context=32, **overrides)
    return GPT(cfg).eval()


def test_shapes_and_hidden():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (3, 10))
    logits, hidden = model(ids, return_hidden=True)
    assert logits.shape == (3, 10, VOCAB)
    assert hidden.shape == (3, 10, 64)
    torch.testing.assert_close(model.hidden_states(ids), hidden, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, last_only=True), logits[:, -1:], rtol=0, atol=1e-6)


def test_causal_mask_future_token_does_not_change_past():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (1, 20))
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % VOCAB
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_padding_mask_matches_unpadded_singles():
    model = tiny_model()
    lengths = [7, 12, 3]
    seqs = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    batch = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
        batch[i, len(s):] = 5  # arbitrary pad id
        mask[i, : len(s)] = 1
    out = model(batch, attention_mask=mask)
    assert torch.isfinite(out).all()
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i, : len(s)], model(s[None])[0], rtol=0, atol=1e-5)


def test_fully_padded_row_gives_no_nan():
    model = tiny_model()
    out = model(torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.tensor([[1] * 6, [0] * 6]))
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_kv_cache_logits_equal_full_forward():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 24))
    full = model(ids)
    cache = model.new_kv_cache(2, 32)
    prefill = model(ids[:, :10], kv_cache=cache)  # prompt in one go
    chunk = model(ids[:, 10:14], kv_cache=cache)  # several tokens after cached ones (offset causal mask)
    steps = [model(ids[:, t : t + 1], kv_cache=cache) for t in range(14, 24)]  # one at a time
    assert cache.length == 24
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_kv_cache_refuses_overflow_and_grad():
    model = tiny_model()
    cache = model.new_kv_cache(1, 8)
    with pytest.raises(ValueError, match="inference"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="context"):
            model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len=40"):
        model.new_kv_cache(1, 40)


def test_weight_tying_and_init():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    torch.manual_seed(0)
    big = GPT(GPTConfig.from_preset("mini", vocab_size=4096))
    assert abs(big.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    assert abs(big.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / 8 ** 0.5) < 1e-3
    assert big.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0.0


def test_gpt2_preset_param_count():
    config = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT(config)
    assert num_params(model) == 124_439_808
    assert num_params(model, exclude_embeddings=True) == 124_439_808 - 1024 * 768  # positions only
    assert flops_per_token(config) == 6 * num_params(model, exclude_embeddings=True) + 12 * 12 * 768 * 1024
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    assert hf.num_parameters() == 124_439_808


def test_flops_match_param_count_without_bias():
    model = tiny_model(bias=False)
    assert flops_per_token(model.config) == 6 * num_params(model, exclude_embeddings=True) + 12 * 2 * 64 * 32


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="n_embd=100: must be divisible by n_head=3"):
        GPTConfig.from_dict({"vocab_size": 10, "context": 8, "n_layer": 1, "n_head": 3, "n_embd": 100})
    with pytest.raises(ValueError, match="'n_embed' \\(did you mean 'n_embd'\\?\\)"):
        GPTConfig.from_dict({"n_embed": 64})
    with pytest.raises(ValueError, match="n_layer='4'"):
        GPTConfig.from_dict({"n_layer": "4"})
    with pytest.raises(ValueError, match="dropout=1.5"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="unknown GPT preset 'huge'"):
        GPTConfig.from_preset("huge")
    with pytest.raises(ValueError, match="activation='swish': must be one of gelu, gelu_new"):
        GPTConfig(activation="swish")
    cfg = GPTConfig.from_preset("small", vocab_size=1000)
    assert GPTConfig.from_dict({"model_type": "gpt", **cfg.to_dict()}) == cfg


def test_activation_default_and_checkpoints_from_before_the_field():
    assert GPTConfig().activation == "gelu"
    legacy = {k: v for k, v in GPTConfig(activation="gelu").to_dict().items() if k != "activation"}
    assert GPTConfig.from_dict(legacy).activation == "gelu_new"  # what every earlier GPT used
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=VOCAB, activation="gelu_new"))
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(model.transformer.h[0].mlp.act(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert set(GPT_PRESETS) >= {"tiny", "mini", "small", "medium", "gpt2"}


def test_logits_equal_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    model = tiny_model(seed=1)
    c = model.config
    for p in model.parameters():  # non-trivial LayerNorm / bias values too
        torch.nn.init.normal_(p, std=0.1)
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        layer_norm_epsilon=c.layer_norm_eps, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = model.state_dict()
    hf_state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in ours.items()}  # names map 1:1
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, 13:] = 0
        ref = hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, attention_mask=mask)[1, :13], ref[1, :13], rtol=0, atol=1e-4)


def test_forward_with_targets_is_the_summed_next_token_loss_with_the_same_gradients():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 12))
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    loss_sum, correct, counted = model(ids, targets=targets)
    loss_sum.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    ref.backward()
    assert loss_sum.item() == pytest.approx(ref.item(), rel=1e-6) and counted.item() == 22
    assert correct.item() == int((logits.argmax(-1)[:, :-1] == ids[:, 1:]).sum())
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_residual_projection_adds_in_place_with_the_same_values_and_gradients(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 8, bias=bias)
    x, residual = torch.randn(2, 5, 12, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    out = add_projection(residual, linear, x, torch.nn.Dropout(0.0))
    grads = torch.autograd.grad(out.pow(2).sum(), [x, residual, *linear.parameters()])
    ref = residual + linear(x)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, residual, *linear.parameters()])
    torch.testing.assert_close(out, ref)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs)
    dropout = torch.nn.Dropout(0.5)  # training with dropout: dropped outputs, so the plain sum
    assert (add_projection(residual, linear, x, dropout) - residual == 0).any()
