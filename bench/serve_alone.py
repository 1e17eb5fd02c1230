"""Serving benchmark, each server alone: our default endpoint vs vLLM's own OpenAI server, never both up.

bench/serve.py keeps vLLM's server up beside ours and interleaves their turns. On 2 cores the idle
server then taxes the busy one, unequally: at c=1 vLLM's default layout uses both cores (its model
worker pinned to core 0, its engine core busy-polling on the other), and a probe measured our idle
stack costing it about 30 % and vLLM's idle server costing ours about 10 %. Here each server runs
alone, started and stopped in turn in the order ours, vLLM, vLLM, ours, vLLM, ours, ours, vLLM (ABBA
then BAAB: a drift that is steady, or bends once, over the run weighs on both alike; a turn takes about
80 s, and with four turns one slow minute at the end decided the ratio). Each turn runs every
concurrency level twice; each side's rounds are pooled per level.
Same models, prompts, output length and engine settings as bench/serve.py (its cached models).

    .venv/bin/python bench/serve_alone.py      # ~12 min on 2 cores once bench/serve.py has trained the models
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve as S  # noqa: E402 - bench/serve.py: models, prompts, vLLM's server, Ray start/stop

ORDER = ("ours", "vllm_serve", "vllm_serve", "ours", "vllm_serve", "ours", "ours", "vllm_serve")
ROUNDS_PER_TURN = 2


def measure(url: str, ps: list[str], api_key: str | None = None) -> dict[int, list[dict]]:
    from llmray.serving.loadgen import run_load

    S.warm_up(url, ps, api_key)
    return {c: [run_load(url, "bench", ps, c, S.REQUESTS[c], S.MAX_TOKENS, api_key) for _ in range(ROUNDS_PER_TURN)]
            for c in S.CONCURRENCY}


def turn_ours(model: Path, ps: list[str], i: int) -> dict[int, list[dict]]:
    from llmray.cluster import free_port
    from llmray.serving.server import direct_ingress_env, start

    S.start_ray(direct_ingress_env(free_port()))
    try:
        handle = start(S.our_config(f"alone-{i}", model, S.ENGINE))
        try:
            return measure(handle.url, ps, handle.api_key)
        finally:
            handle.shutdown()
    finally:
        S.stop_ray()
        for k in direct_ingress_env(0):
            os.environ.pop(k, None)


def main() -> int:
    from llmray.serving.loadgen import merge

    S.set_engine_env()
    t0 = time.monotonic()
    m = S.prepare()
    ps = S.prompts()
    runs: dict[str, dict[int, list[dict]]] = {"ours": {c: [] for c in S.CONCURRENCY},
                                              "vllm_serve": {c: [] for c in S.CONCURRENCY}}
    for i, who in enumerate(ORDER):
        S.log(f"turn {i + 1}/{len(ORDER)}: {who} alone")
        if who == "ours":
            got = turn_ours(m["target"], ps, i)
        else:
            with S.VllmServer(m["target"]) as url:
                got = measure(url, ps)
        for c, rs in got.items():
            runs[who][c] += rs
            S.log(f"  c={c}: {S.rates(rs)} tok/s")
    print()
    print(f"{'server':<12}{'conc':>5}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'e2e p50':>10}{'e2e p99':>10}{'errors':>8}   rounds (tok/s, in run order)")
    pooled = {who: {c: merge(rs) for c, rs in per.items()} for who, per in runs.items()}
    for who, per in pooled.items():
        for c, r in per.items():
            print(f"{who:<12}{c:>5}{r['req_s']:>8.2f}{r['out_tok_s']:>11.0f}{r['ttft_p50_ms']:>8.0f}ms"
                  f"{r['ttft_p99_ms']:>8.0f}ms{r['e2e_p50_ms']:>8.0f}ms{r['e2e_p99_ms']:>8.0f}ms{r['errors']:>8}   "
                  + S.rates(runs[who][c]))
    order = " / ".join(o.replace("vllm_serve", "vllm") for o in ORDER)
    print(f"({len(ORDER)} turns, {order}, each server alone; {ROUNDS_PER_TURN} rounds per level per turn, "
          "pooled per server and level)")
    print()
    print(f"{'ratio (output tok/s)':<36}" + "".join(f"{'c=' + str(c):>8}" for c in S.CONCURRENCY) + "   target")
    print(f"{'ours / vllm_serve, each alone':<36}"
          + "".join(f"{pooled['ours'][c]['out_tok_s'] / pooled['vllm_serve'][c]['out_tok_s']:>8.2f}"
                    for c in S.CONCURRENCY)
          + "   >= 0.9")
    S.OUT.mkdir(parents=True, exist_ok=True)
    (S.OUT / "serve_alone.json").write_text(json.dumps(
        {"order": ORDER, "rounds": {w: {str(c): rs for c, rs in per.items()} for w, per in runs.items()}}, indent=2))
    S.log(f"done in {time.monotonic() - t0:.0f}s; JSON in {S.OUT / 'serve_alone.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
