"""The calculator environment and the episode loop, with a scripted policy standing in for the model
(the loop's `generate` is a plain function here; the GRPO run with tools is in test_rl_loop.py):
tool calls parsed from the hermes format, results in the context, masked out of the loss token by
token, rewarded only for the final answer, and the single-turn task as the one-step case."""

from __future__ import annotations

import pytest

from llmray.rl.env import TaskEnv, calculator, env_factories, make_env, parse_tool_calls
from llmray.rl.episodes import observation_ids, run_episodes

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 + 7"}}</tool_call>'


def test_calculator_and_tool_call_parsing():
    assert calculator("12 + 7") == "19" and calculator("(3 - 5) * 4") == "-8" and calculator("7 / 2") == "3.5"
    assert calculator("__import__('os')").startswith("error:") and calculator("1/0") == "error: division by zero"
    assert parse_tool_calls(f"let me compute {CALL}") == [{"name": "calculator", "arguments": {"expression": "12 + 7"}}]
    assert parse_tool_calls("<tool_call>{not json}</tool_call>")[0]["error"].startswith("tool call is not JSON")
    assert parse_tool_calls("The answer is 19.") == []


def test_env_steps():
    env = TaskEnv("19", tools=True)
    start = env.reset([{"role": "user", "content": "What is 12 plus 7?"}])
    assert start[0]["role"] == "system" and "calculator" in start[0]["content"] and start[1]["role"] == "user"
    obs, reward, done = env.step(CALL)
    assert obs == [{"role": "tool", "content": "19"}] and reward == 0.0 and not done
    assert env.step("The answer is 19.") == ([], 1.0, True)
    # Without tools a tool call is just text: the episode ends with the task's rule reward.
    assert TaskEnv("19").step(CALL) == ([], 0.0, True)
    obs, _, _ = env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert "unknown tool 'search'" in obs[0]["content"]


class ScriptedPolicy:
    """Calls the calculator on the first turn, then answers with the number the tool returned (read
    from the context it is given). Token ids come from the real tokenizer; log-probs are fixed."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, prompt_ids: list[list[int]], sampling: dict) -> list[dict]:
        self.calls.append((len(prompt_ids), sampling["n"]))
        out = []
        for i, p in enumerate(prompt_ids):
            context = self.tok.decode(p)
            result = context.rsplit("<|im_start|>tool\n", 1)[-1].split("<|im_end|>")[0]
            text = CALL if "<|im_start|>tool" not in context else f"The answer is {result}."
            ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
            for j in range(sampling["n"]):
                out.append({"prompt_index": i, "sample_index": j, "prompt_ids": p, "response_ids": ids,
                            "logprobs": [-0.5] * len(ids), "text": text, "finish_reason": "stop"})
        return out


def test_scripted_policy_calls_the_calculator_gets_the_reward_and_tool_tokens_are_masked(tokenizer_dir):
    from transformers import AutoTokenizer

    from llmray.rl.batch import RLBatch

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = [{"prompt": [{"role": "user", "content": "What is 12 plus 7?"}], "answer": "19"},
               {"prompt": [{"role": "user", "content": "What is 12 plus 7?"}], "answer": "20"}]
    starts = [make_env(r, "calculator").reset(r["prompt"]) for r in records]
    prompt_ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                  for m in starts]
    policy = ScriptedPolicy(tok)
    envs = env_factories([r["answer"] for r in records], "calculator")
    out = run_episodes(policy, envs, prompt_ids, {"n": 2, "max_tokens": 32, "seed": 0}, max_turns=3, tokenizer=tok,
                       max_model_len=512)
    assert policy.calls == [(2, 2), (4, 1)]  # turn 1: n samples per prompt; turn 2: one per open episode
    assert [e["env_reward"] for e in out] == [1.0, 1.0, 0.1, 0.1]  # the tool said 19:
        # right for prompt 0, a well-formed wrong answer for prompt 1
    assert all(e["turns"] == 2 and e["tool_calls"] == 1 and e["text"] == "The answer is 19." for e in out)
    # Token by token: the call (model), the tool result (environment, masked), the answer (model).
    call = tok.encode(CALL, add_special_tokens=False) + [tok.eos_token_id]
    obs = observation_ids(tok, [{"role": "tool", "content": "19"}])
    answer = tok.encode("The answer is 19.", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(obs) == "\n<|im_start|>tool\n19<|im_end|>\n<|im_start|>assistant\n"
    e = out[0]
    assert e["response_ids"] == call + obs + answer
    assert e["loss_mask"] == [1] * len(call) + [0] * len(obs) + [1] * len(answer)
    assert e["logprobs"] == [-0.5] * len(call) + [0.0] * len(obs) + [-0.5] * len(answer)
    batch = RLBatch.from_rollouts(out, [r["answer"] for r in records], pad_id=tok.pad_token_id)
    assert batch.train_mask[0].tolist()[:len(e["loss_mask"])] == [float(x) for x in e["loss_mask"]]
    assert batch.response_mask[0].sum() == len(e["response_ids"])  # tool tokens still in the context
    assert batch.env_rewards.tolist() == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_masked_tool_tokens_get_no_advantage_kl_or_gradient(tokenizer_dir):
    import torch

    from llmray.rl.algorithms import AlgoConfig, compute_advantages
    from llmray.rl.batch import RLBatch
    from llmray.rl.ppo.losses import policy_loss

    rollouts = [{"prompt_index": 0, "sample_index": j, "prompt_ids": [5, 6], "response_ids": [7, 8, 9, 10],
                 "logprobs": [-1.0, 0.0, 0.0, -1.0], "loss_mask": [1, 0, 0, 1], "text": "", "env_reward": float(j)}
                for j in range(2)]
    batch = RLBatch.from_rollouts(rollouts, ["1"], pad_id=0)
    batch = batch.replace(scores=batch.env_rewards, ref_logprobs=torch.full((2, 4), -2.0),
                          logprobs=batch.rollout_logprobs)
    cfg = AlgoConfig(algorithm="grpo", n_samples=2, prompts_per_step=1, minibatch_size=2, kl_in_reward=True)
    out, stats = compute_advantages(batch, cfg, kl_coef=0.1)
    assert out.advantages[:, 1:3].abs().sum() == 0 and out.advantages[:, 0].abs().min() > 0
    assert out.token_rewards[:, 1:3].abs().sum() == 0  # no KL penalty on the tool's tokens
    lp = torch.zeros(2, 4, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(2, 4), out.advantages, out.train_mask)
    loss.backward()
    assert lp.grad[:, 1:3].abs().sum() == 0 and lp.grad[:, 0].abs().min() > 0


def test_single_turn_task_is_the_one_step_case(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    policy = ScriptedPolicy(tok)
    envs = env_factories(["19"], "task")
    out = run_episodes(policy, envs, [[1, 2, 3]], {"n": 3, "max_tokens": 8, "seed": 0}, max_turns=1, tokenizer=tok,
                       max_model_len=64)
    assert policy.calls == [(1, 3)] and len(out) == 3
    assert all(e["turns"] == 1 and e["loss_mask"] == [1] * len(e["response_ids"]) for e in out)
    assert all(e["env_reward"] == 0.0 for e in out)  # a bare tool call is no answer


def test_tool_config_keys_are_checked_by_name():
    from llmray.config import ConfigError, load
    from llmray.rl.config import RLConfig

    with pytest.raises(ConfigError, match="rollout.max_turns"):
        load(RLConfig, None, ["rollout.env=calculator"])
    with pytest.raises(ConfigError, match="rollout.max_turns.*grpo or rloo"):
        load(RLConfig, None, ["rollout.env=calculator", "rollout.max_turns=3", "algo.algorithm=ppo"])
