"""Rollouts as episodes: the model's turns, environment observations in between, up to `max_turns`.

    rollouts = run_episodes(generate, envs, prompt_ids, sampling, max_turns=4, tokenizer=tok,
                            max_model_len=512)

`generate(prompt_ids, sampling)` is the rollout group's (n samples per prompt, prompt-major). Turn 1
samples `n` responses per prompt; each sample is then an episode with its own environment
(`envs[prompt_index]()` builds it). After a turn the environment answers (`Env.step`); while an
episode is not done, its observation (e.g. tool results) is appended as chat-template tokens and
the model continues from prompt + everything so far (one sample). A single-turn task is the case
where the first `step` ends the episode.

Each rollout record is the rollout worker's ({"prompt_index", "sample_index", "prompt_ids",
"response_ids", "logprobs", "text", "finish_reason"}) plus "loss_mask" (1 on the model's tokens,
0 on observation tokens), "token_versions", "env_reward", "turns" and "tool_calls"; "text" is the
last turn's. A turn's tokens carry the weight version `version()` names, unless its rollout records
them per token (a partial rollout's first turn, `llmray.rl.segments`). An
episode that runs out of turns, or of context (`max_model_len`), ends with reward 0
(finish_reason "max_turns" / "context").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from llmray.rl.env import Env


@dataclass
class Episode:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    env: Env
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    text: str = ""
    reward: float = 0.0
    done: bool = False
    turns: int = 0
    finish_reason: str = ""

    def record(self) -> dict:
        return {"prompt_index": self.prompt_index, "sample_index": self.sample_index, "prompt_ids": self.prompt_ids,
                "response_ids": self.response_ids, "logprobs": self.logprobs, "loss_mask": self.loss_mask,
                "token_versions": self.versions, "text": self.text, "finish_reason": self.finish_reason,
                "env_reward": self.reward, "turns": self.turns,
                "tool_calls": getattr(self.env, "tool_calls", 0)}


def observation_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens between an assistant turn's EOS and the next assistant turn's first token that carry
    `messages` (e.g. tool results), as the tokenizer's chat template writes them."""
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + messages, tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token
    if not after.startswith(before) or eos not in before:
        raise ValueError("the chat template must end an assistant turn with the EOS token and render "
                         "earlier turns unchanged when messages are appended")
    tail = before[before.rindex(eos) + len(eos):]  # what the template adds after the EOS the model generated
    return tokenizer.encode(tail + after[len(before):], add_special_tokens=False)


def run_episodes(generate: Callable[[list[list[int]], dict], list[dict]], envs: list[Callable[[], Env]],
                 prompt_ids: list[list[int]], sampling: dict, max_turns: int, tokenizer, max_model_len: int,
                 version: Callable[[], int] = lambda: 0) -> list[dict]:
    """Play one episode per (prompt, sample); returns their rollout records, prompt-major."""
    episodes: list[Episode] = []
    active: list[Episode] = []
    outs = generate(prompt_ids, sampling)
    for o in outs:
        i = int(o["prompt_index"])
        ep = Episode(i, int(o["sample_index"]), list(prompt_ids[i]), envs[i]())
        episodes.append(ep)
        active.append(ep)
    turn = 1
    while True:
        v = version()
        for ep, o in zip(active, outs):
            _take_turn(ep, o, v, max_turns, tokenizer, max_model_len, int(sampling["max_tokens"]))
        active = [ep for ep in active if not ep.done]
        if not active:
            break
        turn += 1
        seed = None if sampling.get("seed") is None else int(sampling["seed"]) + 7919 * turn
        outs = generate([ep.prompt_ids + ep.response_ids for ep in active], {**sampling, "n": 1, "seed": seed})
    return [ep.record() for ep in episodes]


def _take_turn(ep: Episode, out: dict[str, Any], version: int, max_turns: int, tokenizer, max_model_len: int,
               max_tokens: int) -> None:
    """Append the model's turn, let the environment answer, and append its observation (or end)."""
    ids = list(out["response_ids"])
    ep.response_ids += ids
    ep.logprobs += [float(x) for x in out["logprobs"]]
    ep.loss_mask += [1] * len(ids)
    ep.versions += [int(v) for v in out["token_versions"]] if "token_versions" in out else [version] * len(ids)
    ep.text, ep.turns = out["text"], ep.turns + 1
    observation, reward, done = ep.env.step(out["text"])
    if done:
        ep.reward, ep.done, ep.finish_reason = float(reward), True, out.get("finish_reason") or "stop"
        return
    if ep.turns >= max_turns:
        ep.reward, ep.done, ep.finish_reason = 0.0, True, "max_turns"
        return
    obs = observation_ids(tokenizer, observation)
    if len(ep.prompt_ids) + len(ep.response_ids) + len(obs) + max_tokens > max_model_len:
        ep.reward, ep.done, ep.finish_reason = 0.0, True, "context"
        return
    ep.response_ids += obs
    ep.logprobs += [0.0] * len(obs)
    ep.loss_mask += [0] * len(obs)
    ep.versions += [version] * len(obs)
