"""RolloutWorker on a real vLLM engine in a Ray actor: token ids + logprobs checked against transformers,
weight sync from a different model checked by greedy equality, and a killed engine restarted,
re-synced and retried. One engine start per module (plus one restart)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_greedy, hf_token_logprobs  # noqa: E402

from llmray.rl.weight_sync import WeightSync, WeightSyncError, put_buckets  # noqa: E402
from llmray.rl.worker_group import WorkerDiedError, WorkerGroup, call_with_restart  # noqa: E402
from llmray.rl.workers.rollout import RolloutWorker  # noqa: E402

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 300, 301, 302, 303], [1, 77, 78, 79]]


@pytest.fixture(scope="module")
def engine(ray_cluster, tiny_model_dir):
    g = WorkerGroup("rollout", RolloutWorker, num_workers=1, resources={"CPU": 1}, call_timeout_s=300,
                    init_kwargs={"model_dir": str(tiny_model_dir), "max_model_len": 128, "dtype": "float32",
                                 "kv_cache_gb": 1})
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def hf_models(tiny_model_dir, other_model_dir):
    from llmray.models.factory import load_pretrained

    return load_pretrained(tiny_model_dir)[0], load_pretrained(other_model_dir)[0]


def test_generate_ids_logprobs_match_transformers(engine, hf_models):
    out = engine.generate(PROMPTS, {"n": 2, "temperature": 1.0, "max_tokens": 12, "seed": 3})
    assert len(out) == 2 * len(PROMPTS)
    assert [(o["prompt_index"], o["sample_index"]) for o in out] == [(i, j) for i in range(4) for j in range(2)]
    base = hf_models[0]
    gaps = []
    for o in out:
        assert o["prompt_ids"] == PROMPTS[o["prompt_index"]]
        assert 1 <= len(o["response_ids"]) == len(o["logprobs"]) <= 12
        assert o["finish_reason"] in ("stop", "length")
        assert all(lp <= 0 for lp in o["logprobs"])
        assert abs(sum(o["logprobs"]) - o["cumulative_logprob"]) < 1e-3
        ref = hf_token_logprobs(base, o["prompt_ids"], o["response_ids"])
        gaps += [abs(a - b) for a, b in zip(o["logprobs"], ref)]
    assert max(gaps) < 2e-3, f"vLLM vs transformers logprob gap {max(gaps):.2e}"
    # Seeded sampling is a function of (seed, global prompt index): the same prompt's samples come
    # back when it is the second prompt of a call with index_offset=1 (what split dispatch sends).
    again = engine.generate.on_rank(0, PROMPTS[1:3], {"n": 2, "max_tokens": 12, "seed": 3}, index_offset=1)
    assert [o["response_ids"] for o in again] == [o["response_ids"] for o in out[2:6]]
    assert [o["prompt_index"] for o in again] == [1, 1, 2, 2]
    # Different samples of one prompt differ, and the same seed offsets do not repeat across prompts.
    assert out[0]["response_ids"] != out[1]["response_ids"]
    assert out[1]["response_ids"] != out[2]["response_ids"]


def test_greedy_equals_transformers_then_after_sync_from_other_model(engine, hf_models, tokenizer_dir):
    from llmray.models.tokenizer import load_tokenizer

    eos = load_tokenizer(tokenizer_dir).eos_token_id
    base, other = hf_models
    assert engine.greedy(PROMPTS, 10) == [hf_greedy(base, p, 10, eos) for p in PROMPTS]
    expected = [hf_greedy(other, p, 10, eos) for p in PROMPTS]
    assert expected != [hf_greedy(base, p, 10, eos) for p in PROMPTS]

    sync = WeightSync(bucket_mb=0.5, timeout_s=120)
    m = sync.push(put_buckets(other.named_parameters(), bucket_mb=0.5), engine)
    assert m["weight_sync/buckets"] > 2 and m["weight_sync/tensors"] == len(list(other.named_parameters()))
    assert m["weight_sync/bytes"] == sum(p.numel() * 4 for p in other.parameters())
    assert engine.greedy(PROMPTS, 10) == expected
    # logprobs now follow the new weights too
    o = engine.generate(PROMPTS[:1], {"max_tokens": 6, "seed": 0})[0]
    ref = hf_token_logprobs(other, o["prompt_ids"], o["response_ids"])
    assert max(abs(a - b) for a, b in zip(o["logprobs"], ref)) < 2e-3


def test_killed_engine_is_restarted_resynced_and_retried(engine, hf_models, tokenizer_dir):
    """Issue 9 item 3: kill the rollout process by PID mid-run; the retried call succeeds on the
    restarted engine, which serves the re-synced weights (not the ones it loads from disk)."""
    from llmray.models.tokenizer import load_tokenizer

    eos = load_tokenizer(tokenizer_dir).eos_token_id
    base, other = hf_models
    sync = WeightSync(bucket_mb=0.5, timeout_s=120)
    sync.push(other.named_parameters(), engine)          # the "current" weights: not the disk model's
    expected = [hf_greedy(other, p, 8, eos) for p in PROMPTS]

    pid = engine.pids()[0]
    pending = engine.generate.submit(PROMPTS * 8, {"n": 4, "max_tokens": 64, "seed": 1})
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)                         # mid-call
    with pytest.raises(WorkerDiedError, match="rollout rank 0 died"):
        pending.result()
    # A push to a dead engine names it as dead, so the controller restarts it and pushes again.
    with pytest.raises(WeightSyncError, match="rank 0 failed loading bucket") as failed:
        sync.push(other.named_parameters(), engine)
    assert failed.value.dead_ranks == (0,)

    resynced = []

    def on_restart(group, ranks):
        resynced.append(sync.resync(group, ranks))

    got = call_with_restart(engine.greedy, PROMPTS, 8, on_restart=on_restart, max_restarts=1)
    assert got == expected
    assert resynced and resynced[0]["weight_sync/buckets"] >= 1
    assert len(engine.restarts) == 1 and "WorkerDiedError" in engine.restarts[0]["cause"]
    assert engine.pids()[0] != pid and engine.alive() == [True]
