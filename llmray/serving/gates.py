"""The release gate: measure, at the deployment's target concurrency, whether speculation or the
quantized model is faster than the plain engine, and enable only a candidate that is."""

from __future__ import annotations

import logging
from typing import Any

from llmray.config import replace
from llmray.serving.config import ServeConfig
from llmray.serving.speculative import SpeculativeConfig

log = logging.getLogger(__name__)

# Prompts whose continuation repeats their context: where prompt lookup can pay.
GATE_PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "The answer is 12. The answer is 12. The answer is",
    "one two three four one two three four one two three",
    "red green blue red green blue red green",
]


def decide(baseline_tok_s: float, candidates: dict[str, float], min_speedup: float,
           identical: dict[str, bool] | None = None) -> dict[str, Any]:
    """Pick the fastest candidate whose tok/s is at least `min_speedup` x the baseline, or none. With
    `identical` (candidate -> greedy outputs equal the baseline's), a candidate that changed them is never picked."""
    speedups = {k: v / baseline_tok_s if baseline_tok_s > 0 else 0.0 for k, v in candidates.items()}
    ok = identical or {}
    passing = {k: s for k, s in speedups.items() if s >= min_speedup and ok.get(k, identical is None)}
    chosen = max(passing, key=passing.get) if passing else None
    out = {"baseline_tok_s": round(baseline_tok_s, 1), "speedups": {k: round(s, 3) for k, s in speedups.items()},
           "min_speedup": min_speedup, "enabled": chosen}
    if identical is not None:
        out["identical"] = {k: bool(ok.get(k, False)) for k in candidates}
    return out


def speculative_decision(results: dict[str, dict[str, Any]], concurrency: int, min_speedup: float,
                         num_speculative_tokens: int, draft_model: str | None) -> dict[str, Any]:
    """The draft stage's gate: from `serving.probe` results of `plain` and the candidates (`draft`, `ngram`),
    the speculation to serve with at `concurrency` (output tok/s, greedy answers identical to plain)."""
    c = str(concurrency)
    plain = results["plain"]
    cands = {k: r for k, r in results.items() if k != "plain"}
    d = decide(plain["tok_s"][c], {k: r["tok_s"][c] for k, r in cands.items()}, min_speedup,
               identical={k: r.get("answers") == plain.get("answers") for k, r in cands.items()})
    method = d["enabled"]
    return {"method": method, "num_speculative_tokens": num_speculative_tokens if method else None,
            "draft_model": draft_model if method == "draft" else None, "concurrency": concurrency,
            "tok_s": {"plain": plain["tok_s"][c], **{k: r["tok_s"][c] for k, r in cands.items()}},
            "acceptance_rate": {k: r.get("acceptance_rate") for k, r in cands.items()},
            **{k: d[k] for k in ("speedups", "identical", "min_speedup")}}


def variant(cfg: ServeConfig, name: str) -> ServeConfig:
    """The ServeConfig of one gate candidate (or of the baseline, `plain`)."""
    eng = cfg.engine
    if name == "plain":
        return replace(cfg, engine=replace(eng, speculative=SpeculativeConfig()))
    if name == "ngram":
        return replace(cfg, engine=replace(eng, speculative=SpeculativeConfig(method="ngram")))
    if name == "draft":
        return replace(cfg, engine=replace(eng, speculative=SpeculativeConfig(
            method="draft", draft_model=cfg.gate.draft_model, num_speculative_tokens=3)))
    if name == "quantized":
        return replace(cfg, model=cfg.gate.quantized_model, served_model_name=cfg.name(),
                       engine=replace(eng, speculative=SpeculativeConfig()))
    raise ValueError(name)


def measure(cfg: ServeConfig) -> float:
    """Output tok/s of `cfg` served on a temporary application at gate.concurrency."""
    from llmray.serving.loadgen import run_load
    from llmray.serving.server import start

    tmp = replace(cfg, app_name=f"{cfg.app_name}-gate", route_prefix="/gate", block=False)
    handle = start(tmp)
    try:
        g = cfg.gate
        run_load(handle.url, handle.model_name, GATE_PROMPTS, g.concurrency, g.concurrency, 8, handle.api_key)
        r = run_load(handle.url, handle.model_name, GATE_PROMPTS, g.concurrency, g.num_requests, g.max_tokens,
                     handle.api_key)
    finally:
        handle.shutdown()
    if r["errors"]:
        log.warning("gate: %d errors while measuring", r["errors"])
    return r["out_tok_s"]


def apply_gate(cfg: ServeConfig) -> tuple[ServeConfig, dict[str, Any]]:
    """Measure the baseline and every candidate; return the config to deploy and the decision."""
    base = measure(variant(cfg, "plain"))
    cands = {name: measure(variant(cfg, name)) for name in cfg.gate.candidates}
    decision = decide(base, cands, cfg.gate.min_speedup)
    log.info("release gate at concurrency %d: %s", cfg.gate.concurrency, decision)
    chosen = decision["enabled"]
    return (variant(cfg, chosen) if chosen else variant(cfg, "plain")), decision
