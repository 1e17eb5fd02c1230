"""vLLM engine variants on the tiny model: greedy tokens identical with n-gram and draft-model
speculation (with drafts proposed and counted). All variants run in one subprocess. (Quantized
checkpoints on the engine: tests/serving/test_quantize_stage.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_speculation_keeps_greedy_tokens(tmp_path, tiny_model_dir, draft_dir, tokenizer_dir):
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
