"""Partial-rollout bookkeeping (llmray.rl.segments) against hand-written engine answers, the batch's
version statistics, and the `rollout.partial` config checks. Pure: no Ray, no engine."""

import pytest

from llmray.config import ConfigError, load
from llmray.rl.batch import RLBatch
from llmray.rl.config import RLConfig
from llmray.rl.pipeline import version_stats
from llmray.rl.segments import advance, finished_records, segment_requests, segment_seed, spans_versions

PROMPTS = [[5, 6], [9, 10, 11]]
SAMPLING = {"n": 2, "temperature": 1.0, "max_tokens": 5, "seed": 77}


def _out(i, j, ids, finish, lp=-0.5):
    return {"prompt_index": i, "sample_index": j, "response_ids": ids, "logprobs": [lp] * len(ids),
            "text": "".join(f"<{t}>" for t in ids), "finish_reason": finish}


def test_segments_continue_unfinished_samples_with_the_remaining_tokens_and_record_versions():
    # Segment 0: every prompt, n samples, at most segment_tokens (2) of the 5 tokens.
    (r0,) = segment_requests(PROMPTS, SAMPLING, 2, 0, None)
    assert r0.parts is None and r0.prompt_ids == PROMPTS
    assert r0.sampling == {**SAMPLING, "max_tokens": 2}  # n and the step's own seed unchanged
    parts = advance(PROMPTS, SAMPLING, None, [r0], [[
        _out(0, 0, [7, 8], "length"), _out(0, 1, [2], "stop"),      # sample (0, 1) hit EOS: finished
        _out(1, 0, [3, 4], "length"), _out(1, 1, [6, 7], "length")]], version=3)
    assert [len(p.response_ids) for p in parts] == [2, 1, 2, 2]

    # Segment 1: the three unfinished samples, one each, from prompt + tokens so far, 2 more tokens.
    (r1,) = segment_requests(PROMPTS, SAMPLING, 2, 1, parts)
    assert r1.parts == (0, 2, 3)
    assert r1.prompt_ids == [[5, 6, 7, 8], [9, 10, 11, 3, 4], [9, 10, 11, 6, 7]]
    assert r1.sampling["n"] == 1 and r1.sampling["max_tokens"] == 2
    assert r1.sampling["seed"] == segment_seed(77, 1) and r1.sampling["seed"] not in (77, 78, None)
    # A push landed: this segment ran with version 4. The engine numbers its prompts 0..2.
    parts = advance(PROMPTS, SAMPLING, parts, [r1], [[
        _out(0, 0, [9, 2], "stop", -0.25), _out(1, 0, [5, 5], "length", -0.25),
        _out(2, 0, [8, 8], "length", -0.25)]], version=4)

    # Segment 2: only the two samples still short of max_tokens 5, with the 1 token left.
    (r2,) = segment_requests(PROMPTS, SAMPLING, 2, 2, parts)
    assert r2.parts == (2, 3) and r2.sampling["max_tokens"] == 1
    assert r2.sampling["seed"] == segment_seed(77, 2) != r1.sampling["seed"]
    parts = advance(PROMPTS, SAMPLING, parts, [r2], [[_out(0, 0, [1], "length"), _out(1, 0, [2], "stop")]],
                    version=4)
    assert segment_requests(PROMPTS, SAMPLING, 2, 3, parts) == []  # everything finished

    recs = finished_records(PROMPTS, parts)
    assert [(r["prompt_index"], r["sample_index"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["response_ids"] for r in recs] == [[7, 8, 9, 2], [2], [3, 4, 5, 5, 1], [6, 7, 8, 8, 2]]
    assert [r["token_versions"] for r in recs] == [[3, 3, 4, 4], [3], [3, 3, 4, 4, 4], [3, 3, 4, 4, 4]]
    assert recs[0]["logprobs"] == [-0.5, -0.5, -0.25, -0.25] and recs[0]["cumulative_logprob"] == -1.5
    assert [r["finish_reason"] for r in recs] == ["stop", "stop", "length", "stop"]
    assert recs[2]["prompt_ids"] == [9, 10, 11] and recs[0]["text"] == "<7><8><9><2>"
    assert [spans_versions(r["token_versions"]) for r in recs] == [True, False, True, True]


def test_segment_tokens_at_least_max_tokens_is_one_call_like_an_unsegmented_generation():
    (r0,) = segment_requests(PROMPTS, SAMPLING, 8, 0, None)
    assert r0.sampling == SAMPLING
    parts = advance(PROMPTS, SAMPLING, None, [r0], [[_out(i, j, [1, 2, 3, 4, 5], "length")
                                                     for i in range(2) for j in range(2)]], version=0)
    assert segment_requests(PROMPTS, SAMPLING, 8, 1, parts) == []
    assert segment_seed(77, 0) == 77 and segment_seed(None, 3) is None
    with pytest.raises(ValueError, match="rollout.segment_tokens"):
        segment_requests(PROMPTS, SAMPLING, 0, 0, None)


def test_a_wrong_number_of_continuations_is_an_error():
    (r0,) = segment_requests(PROMPTS, SAMPLING, 2, 0, None)
    parts = advance(PROMPTS, SAMPLING, None, [r0], [[_out(0, 0, [7, 8], "length"), _out(0, 1, [7, 8], "length"),
                                                     _out(1, 0, [2], "stop"), _out(1, 1, [2], "stop")]], 0)
    (r1,) = segment_requests(PROMPTS, SAMPLING, 2, 1, parts)
    with pytest.raises(ValueError, match="2 continuations asked, 1 returned"):
        advance(PROMPTS, SAMPLING, parts, [r1], [[_out(0, 0, [1], "length")]], 1)


def test_version_stats_take_the_oldest_token_and_the_share_of_rows_spanning_versions():
    recs = [{"prompt_index": 0, "prompt_ids": [5], "response_ids": [1, 2, 3], "logprobs": [0.0] * 3,
             "token_versions": [2, 2, 3]},
            {"prompt_index": 0, "prompt_ids": [5], "response_ids": [1], "logprobs": [0.0], "token_versions": [3]},
            {"prompt_index": 1, "prompt_ids": [6], "response_ids": [4, 4], "logprobs": [0.0] * 2,
             "token_versions": [3, 3]},
            {"prompt_index": 1, "prompt_ids": [6], "response_ids": [4, 2], "logprobs": [0.0] * 2,
             "token_versions": [1, 3]}]
    b = RLBatch.from_rollouts(recs, ["a", "b"], pad_id=0, version=9)  # padding carries 9: not counted
    assert version_stats(b, 9) == (1, 0.5)


def test_partial_rollouts_are_on_in_async_mode_by_default_and_refused_in_sync_mode():
    async_cfg = ["rollout.mode=async", "algo.algorithm=grpo", "algo.minibatch_size=32", "algo.tis_cap=2.0"]
    assert load(RLConfig, None, async_cfg).rollout.partial_rollouts
    assert not load(RLConfig, None, [*async_cfg, "rollout.partial=false"]).rollout.partial_rollouts
    assert not load(RLConfig, None, []).rollout.partial_rollouts
    with pytest.raises(ConfigError, match="rollout.partial") as e:
        load(RLConfig, None, ["rollout.partial=true"])
    assert "rollout.mode: async" in str(e.value)
    with pytest.raises(ConfigError, match="rollout.segment_tokens"):
        load(RLConfig, None, [*async_cfg, "rollout.segment_tokens=0"])
