"""RLBatch split/concat/padding, prompt data checks, and compute_advantages for PPO/GRPO/RLOO."""

import json

import pytest
import torch

from llmray.config import ConfigError, load
from llmray.errors import UserError
from llmray.rl.algorithms import AlgoConfig, compute_advantages
from llmray.rl.batch import RLBatch


def _rollouts():
    def r(i, prompt, response, lps, text, finish):
        return {"prompt_index": i, "prompt_ids": prompt, "response_ids": response, "logprobs": lps, "text": text,
                "finish_reason": finish}

    return [
        r(0, [5, 6], [7, 2], [-0.1, -0.2], "a", "stop"),
        r(0, [5, 6], [8], [-0.3], "b", "stop"),
        r(1, [9, 10, 11], [7, 7, 7], [-1.0, -1.0, -1.0], "c", "length"),
        r(1, [9, 10, 11], [2], [-0.5], "d", "stop"),
    ]


def test_from_rollouts_pads_prompts_left_and_responses_right():
    b = RLBatch.from_rollouts(_rollouts(), answers=["x", "y"], pad_id=0)
    assert b.prompt_ids.tolist()[0] == [0, 5, 6] and b.prompt_ids.tolist()[2] == [9, 10, 11]
    assert b.response_ids.tolist()[1] == [8, 0, 0]
    assert b.response_mask.tolist()[0] == [1, 1, 0]
    assert b.rollout_logprobs.tolist()[1] == pytest.approx([-0.3, 0, 0])
    assert b.answers == ["x", "x", "y", "y"]
    # positions restart at 0 on the first real prompt token (vLLM sees unpadded prompts)
    assert b.position_ids.tolist()[0][:3] == [0, 0, 1]
    assert b.input_ids.shape == (4, 6)


def test_split_concat_roundtrip_with_different_widths():
    b = RLBatch.from_rollouts(_rollouts(), answers=["x", "y"], pad_id=0)
    b = b.replace(scores=torch.tensor([1.0, 0.0, 0.5, 0.1]))
    parts = b.split(2)
    assert [len(p) for p in parts] == [2, 2]
    # shards re-padded independently still concat back to the same tensors
    small = parts[0].replace(response_ids=parts[0].response_ids[:, :2], response_mask=parts[0].response_mask[:, :2],
                             rollout_logprobs=parts[0].rollout_logprobs[:, :2], prompt_ids=parts[0].prompt_ids[:, 1:],
                             prompt_mask=parts[0].prompt_mask[:, 1:])
    joined = RLBatch.concat([small, parts[1]])
    assert torch.equal(joined.response_ids, b.response_ids) and torch.equal(joined.prompt_ids, b.prompt_ids)
    assert joined.scores.tolist() == b.scores.tolist() and joined.texts == b.texts
    assert [len(p) for p in b.split(3)] == [2, 1, 1]
    assert sum(len(m) for m in b.minibatches(3, seed=0)) == 4


def test_episode_counts_ride_with_their_rows():
    recs = [{**r, "turns": t, "tool_calls": c} for r, t, c in zip(_rollouts(), [1, 3, 2, 1], [0, 2, 1, 0])]
    b = RLBatch.from_rollouts(recs, answers=["x", "y"], pad_id=0)
    assert b.turns.tolist() == [1, 3, 2, 1] and b.tool_calls.tolist() == [0, 2, 1, 0]
    picked = b.select([2, 1])
    assert picked.turns.tolist() == [2, 3] and picked.tool_calls.tolist() == [1, 2]
    assert RLBatch.concat(b.split(2)).tool_calls.tolist() == [0, 2, 1, 0]
    assert RLBatch.from_rollouts(_rollouts(), answers=["x", "y"], pad_id=0).turns is None  # records without them


def _scored(scores, n):
    B, T = len(scores), 3
    b = RLBatch(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                response_ids=torch.ones(B, T, dtype=torch.long), response_mask=torch.tensor([[1, 1, 0]] * B).float(),
                prompt_index=torch.arange(B) // n)
    return b.replace(scores=torch.tensor(scores), logprobs=torch.full((B, T), -1.0),
                     ref_logprobs=torch.full((B, T), -1.5),
                     values=torch.zeros(B, T))


def test_compute_advantages_grpo_rloo_ppo():
    b = _scored([1.0, 0.0, 0.5, 0.5], n=2)
    grpo = AlgoConfig(algorithm="grpo", n_samples=2, prompts_per_step=2, minibatch_size=4, kl_coef=0.1)
    out, st = compute_advantages(b, grpo, kl_coef=0.1)
    a = out.advantages
    assert a[0, 0].item() == pytest.approx(0.5 / (2 ** 0.5 / 2), rel=1e-3)  # (1-.5)/std([1,0])
    assert a[0, 2].item() == 0.0 and a[2].abs().max().item() == 0.0
    assert st["kl/seq_mean"] == pytest.approx(1.0)  # k1 = 0.5 per token x 2 tokens
    # GRPO keeps the KL out of the reward by default: returns are the plain scores
    assert out.returns[:, 0].tolist() == pytest.approx([1.0, 0.0, 0.5, 0.5])
    rloo = AlgoConfig(algorithm="rloo", n_samples=2, prompts_per_step=2, minibatch_size=4, kl_coef=0.1)
    out, _ = compute_advantages(b, rloo, kl_coef=0.1)
    # KL in the reward: every sequence pays 0.1 * 1.0; the leave-one-out difference is unchanged
    assert out.advantages[:, 0].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    ppo = AlgoConfig(algorithm="ppo", n_samples=2, prompts_per_step=2, minibatch_size=4, kl_coef=0.1,
                     whiten_advantages=False, gamma=1.0, lam=1.0)
    out, _ = compute_advantages(b, ppo, kl_coef=0.1)
    # V = 0, gamma = lam = 1: A_t = reward-to-go = score - 0.1 * 0.5 per remaining token
    assert out.advantages[0].tolist() == pytest.approx([1.0 - 0.1, 1.0 - 0.05, 0.0])
    assert out.token_rewards[0].tolist() == pytest.approx([-0.05, 1.0 - 0.05, 0.0])


def test_config_errors_name_the_key():
    from llmray.rl.config import RLConfig

    with pytest.raises(ConfigError, match="algo.n_samples.*grpo needs at least 2"):
        load(RLConfig, None, ["algo.algorithm=grpo", "algo.n_samples=1"])
    with pytest.raises(ConfigError, match="rloo needs at least 2"):
        load(RLConfig, None, ["algo.algorithm=rloo", "algo.n_samples=1"])
    with pytest.raises(ConfigError, match="algo.critic_warmup: grpo has no critic"):
        load(RLConfig, None, ["algo.algorithm=grpo", "algo.critic_warmup=2"])
    with pytest.raises(ConfigError, match="actor.num_workers: must divide the rollout batch"):
        load(RLConfig, None, ["actor.num_workers=3"])
    with pytest.raises(ConfigError, match="algo.minibatch_size: must divide"):
        load(RLConfig, None, ["algo.minibatch_size=5"])
    with pytest.raises(ConfigError, match="reward.model: required"):
        load(RLConfig, None, ["reward.kind=model"])
    with pytest.raises(ConfigError, match="ptx_data: required"):
        load(RLConfig, None, ["algo.ptx_coef=0.1"])
    # no critic for grpo: its worker count is not checked
    load(RLConfig, None, ["algo.algorithm=grpo", "critic.num_workers=3"])


def test_prompt_records_are_checked(tmp_path):
    from llmray.rl.data import PromptStream, read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}) + "\n"
                 + json.dumps({"prompt": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: field 'answer' is missing"):
        read_prompts(f)
    f.write_text(json.dumps({"prompt": "not a list", "answer": "1"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:1: field 'prompt'"):
        read_prompts(f)
    s = PromptStream(5, seed=0)
    first = s.indices(0, 5)
    assert sorted(first) == [0, 1, 2, 3, 4] and s.indices(3, 4)[:2] == first[3:]


def test_prompt_filter_keeps_prompts_solved_sometimes():
    from llmray.rl.data import pass_rates, select_by_pass_rate

    answers = ["4", "river", "9"]
    responses = ["The answer is 4.", "The answer is 4.", "The answer is 5.", "The answer is 4.",  # 3/4
                 "The answer is river.", "The answer is river.", "The answer is river.", "river",  # 3/4 (no format)
                 "The answer is 8.", "The answer is 7.", "nine", "The answer is 90."]  # 0/4
    rates = pass_rates(answers, responses, 4)
    assert rates == [0.75, 0.75, 0.0]
    assert select_by_pass_rate([10, 11, 12], rates, 0.25, 0.9) == [10, 11]
    assert select_by_pass_rate([10, 11, 12], [1.0, 0.5, 0.25], 0.25, 0.9) == [11, 12]  # bounds inclusive
    with pytest.raises(ValueError, match="7 responses for 3 prompts x 4 samples"):
        pass_rates(answers, responses[:7], 4)
    with pytest.raises(ConfigError, match="prompt_filter.min_pass"):
        from llmray.rl.config import RLConfig

        load(RLConfig, None, ["prompt_filter.min_pass=0.8", "prompt_filter.max_pass=0.5"])
