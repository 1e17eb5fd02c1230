"""vLLM engine variants on the tiny model: greedy tokens identical with n-gram and draft-model
speculation (with drafts proposed and counted), and the W8A8 model from `llmray quantize` loads
in vLLM, generates, and passed its perplexity gate. All variants run in one subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmray.errors import UserError

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A smaller draft model sharing the target's tokenizer."""
    from llmray.models.factory import ModelConfig, build_model, save_pretrained
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    out = tmp_path_factory.mktemp("draft")
    save_pretrained(build_model(ModelConfig(preset="tiny", hidden_size=64, num_layers=1, num_heads=2,
                                            num_kv_heads=1), tok, seed=1), tok, out)
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_dir) -> dict:
    from llmray.stages.quantize import QuantizeConfig, run

    out = tmp_path_factory.mktemp("quant") / "w8a8"
    return run(QuantizeConfig(model=str(tiny_model_dir), output=str(out), eval_docs=8, eval_tasks=2))


def test_quantized_artifact_is_smaller_and_gated(quantized):
    from llmray import artifacts

    out = Path(quantized["output"])
    m = artifacts.require(out, "model")
    assert m.metrics["ppl_increase"] <= m.metrics["max_ppl_increase"]
    assert quantized["size_ratio"] < 0.6 and quantized["layers_quantized"] == 14  # 2 layers x 7 Linear
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "int-quantized"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert str(q.dtype) == "torch.int8" and s.shape == (q.shape[0], 1)


def test_quality_gate_failure_publishes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from llmray import evaluation
    from llmray.stages import quantize

    ppl = iter([10.0, 11.0])  # +10% against a 5% gate
    monkeypatch.setattr(evaluation, "perplexity", lambda *a, **k: next(ppl))
    out = tmp_path / "w8a8"
    with pytest.raises(UserError, match="quality gate failed"):
        quantize.run(quantize.QuantizeConfig(model=str(tiny_model_dir), output=str(out), eval_docs=2, eval_tasks=0))
    assert not out.exists() and not list(tmp_path.glob(".w8a8*"))


def test_speculation_keeps_greedy_tokens_and_quantized_model_serves(tmp_path, tiny_model_dir, draft_dir,
                                                                    quantized, tokenizer_dir):
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    texts = ["one two three one two three one two", "The answer is 12. The answer is", "hello world"]
    prompts = [tok(t)["input_ids"] for t in texts]
    engine = {"max_model_len": 256, "max_num_seqs": 8}
    spec = {"prompts": prompts, "max_tokens": 24, "variants": [
        {"name": "plain", "model": str(tiny_model_dir), "engine": engine},
        {"name": "ngram", "model": str(tiny_model_dir), "engine": {**engine, "speculative": {"method": "ngram"}}},
        {"name": "draft", "model": str(tiny_model_dir), "engine": {**engine, "speculative": {
            "method": "draft", "draft_model": str(draft_dir), "num_speculative_tokens": 3}}},
        {"name": "w8a8", "model": quantized["output"], "engine": engine},
    ]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmray.serving.offline", str(tmp_path / "spec.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert [len(t) for t in r["plain"]["tokens"]] == [24, 24, 24]
    assert r["ngram"]["tokens"] == r["plain"]["tokens"]
    assert r["draft"]["tokens"] == r["plain"]["tokens"]
    assert r["ngram"]["draft_tokens"] > 0 and r["draft"]["draft_tokens"] > 0  # speculation really ran
    assert 0 <= r["draft"]["accepted_tokens"] <= r["draft"]["draft_tokens"]
    assert [len(t) for t in r["w8a8"]["tokens"]] == [24, 24, 24]
    vocab = len(tok)
    assert all(0 <= x < vocab for t in r["w8a8"]["tokens"] for x in t)
