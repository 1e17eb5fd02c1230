"""Offline generation on a vLLM engine in a spawned process: the draft stage's training data (the target's
own continuations). Engine measurements (perplexity, tok/s, acceptance) are `llmray.serving.probe`."""

from __future__ import annotations

from typing import Any


def generate(model: str, engine: dict[str, Any], prompts: list[list[int]], max_tokens: int, sampled: int = 0,
             seed: int = 0) -> list[list[int]]:
    """The model's own continuations of token-id prompts: one greedy (temperature 0) per prompt, then
    `sampled` at temperature 1 per prompt; each `max_tokens` long (past EOS, as the speed probe decodes).
    Builds an engine in this process: call it through `in_child`."""
    from llmray.config import build
    from llmray.vllm_engine import EngineConfig, build_llm

    llm = build_llm(model, build(EngineConfig, engine))
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(inputs, greedy, use_tqdm=False)]
    if sampled:
        params = SamplingParams(temperature=1.0, n=sampled, max_tokens=max_tokens, ignore_eos=True, seed=seed)
        outs += [list(c.token_ids) for o in llm.generate(inputs, params, use_tqdm=False) for c in o.outputs]
    return outs


def in_child(fn, *args):
    """`fn(*args)` in a spawned process: the open `llmray.serving.probe.engine_process` if any, else a fresh
    one (vLLM never runs an engine in the caller's process)."""
    from llmray.serving.probe import engine_process

    with engine_process() as pool:
        return pool.submit(fn, *args).result()
