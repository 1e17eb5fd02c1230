"""A closed-loop load generator for OpenAI-compatible servers: N concurrent streaming clients,
fixed prompts and output lengths; reports req/s, output tok/s, TTFT and end-to-end p50/p99.
`merge` pools several runs of one load (rounds interleaved with a baseline's) into one report."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


async def _one(client, url: str, headers: dict, model: str, prompt: Any, max_tokens: int,
               extra: dict | None = None) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    ttft, tokens, ok = None, 0, False
    try:
        async with client.stream("POST", url + "/completions", headers=headers, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ok = True
                    break
                p = json.loads(line[6:])
                if ttft is None and any(c.get("text") for c in p.get("choices", [])):
                    ttft = time.perf_counter() - t0
                if p.get("usage"):
                    tokens = p["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - counted as an error
        return {"ok": False, "status": type(e).__name__}
    return {"ok": ok, "status": 200, "ttft": ttft if ttft is not None else float("nan"),
            "e2e": time.perf_counter() - t0, "tokens": tokens}


async def run_load_async(url: str, model: str, prompts: list, concurrency: int, num_requests: int,
                         max_tokens: int, api_key: str | None = None, extra: dict | None = None) -> dict[str, Any]:
    """`extra`: more request fields (e.g. response_format for JSON mode)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict] = []
    next_i = 0

    async def worker(client):
        nonlocal next_i
        while next_i < num_requests:
            i = next_i
            next_i += 1
            results.append(await _one(client, url, headers, model, prompts[i % len(prompts)], max_tokens, extra))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    good = [r for r in results if r["ok"]]
    return _report(concurrency, len(results), wall, sum(r["tokens"] for r in good),
                   [r["ttft"] for r in good], [r["e2e"] for r in good])


def _report(concurrency: int, requests: int, wall: float, tokens: int, ttft: list[float], e2e: list[float]) -> dict:
    return {
        "concurrency": concurrency, "requests": requests, "errors": requests - len(e2e),
        "req_s": len(e2e) / wall, "out_tok_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "e2e_p50_ms": 1000 * percentile(e2e, 50), "e2e_p99_ms": 1000 * percentile(e2e, 99),
        "wall_s": wall, "tokens": tokens, "ttft_s": ttft, "e2e_s": e2e,
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one load as one: rates over the summed wall time, percentiles over every request."""
    return _report(runs[0]["concurrency"], sum(r["requests"] for r in runs), sum(r["wall_s"] for r in runs),
                   sum(r["tokens"] for r in runs), [x for r in runs for x in r["ttft_s"]],
                   [x for r in runs for x in r["e2e_s"]])


def run_load(*args, **kwargs) -> dict[str, Any]:
    return asyncio.run(run_load_async(*args, **kwargs))
