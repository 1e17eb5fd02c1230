"""Model factory: presets, validation, seeds' init, and a saved directory that transformers loads."""

import math

import pytest

from llmray.config import ConfigError, build
from llmray.models.factory import PRESETS, ModelConfig, build_model, load_pretrained, save_pretrained


def test_presets_sizes():
    tiny = ModelConfig(preset="tiny").resolved().num_params()
    small = ModelConfig(preset="small").resolved().num_params()
    seven = ModelConfig(preset="7b").resolved().num_params()
    assert 1e6 <= tiny <= 3e6
    assert 10e6 <= small <= 30e6
    assert 6.5e9 <= seven <= 7.0e9  # Llama-2-7B's 6.74B


def test_heads_must_divide_hidden():
    with pytest.raises(ConfigError, match=r"model.num_heads: must divide model.hidden_size"):
        build(ModelConfig, {"hidden_size": 100, "num_heads": 3})
    with pytest.raises(ConfigError, match=r"model.num_kv_heads: must divide model.num_heads"):
        build(ModelConfig, {"num_heads": 4, "num_kv_heads": 3})


def test_architecture_and_init(tokenizer_dir):
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny"), tok, seed=0)
    c = model.config
    assert c.model_type == "llama" and c.hidden_act == "silu" and c.num_key_value_heads == 2
    assert c.vocab_size == len(tok) and c.eos_token_id == tok.eos_token_id
    assert sum(p.numel() for p in model.parameters()) == PRESETS["tiny"].__class__(
        **{**PRESETS["tiny"].__dict__, "vocab_size": len(tok)}).num_params()
    layers = c.num_hidden_layers
    q = model.model.layers[0].self_attn.q_proj.weight
    o = model.model.layers[0].self_attn.o_proj.weight
    assert q.std().item() == pytest.approx(0.02, rel=0.1)
    assert o.std().item() == pytest.approx(0.02 / math.sqrt(2 * layers), rel=0.1)
    assert model.model.norm.weight.eq(1).all()


def test_saved_model_loads_and_generates(tiny_model_dir):
    import torch

    files = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    model, tok = load_pretrained(tiny_model_dir)
    ids = tok("The river walks", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 6
    again = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, again)  # greedy decoding is deterministic


def test_save_roundtrip_keeps_weights(tmp_path, tokenizer_dir):
    import torch

    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny"), tok, seed=1)
    save_pretrained(model, tok, tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
