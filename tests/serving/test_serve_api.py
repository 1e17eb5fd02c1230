"""The OpenAI API of a real Serve application on 127.0.0.1, called with httpx and the official
openai client: routes, auth, every bad-input case, streaming, limits, timeouts, disconnects, metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(900)


def test_health_is_public_everything_else_needs_the_key(server, headers, api_key):
    assert httpx.get(server.base + "/health").status_code == 200
    assert httpx.get(server.base + "/ready").json()["status"] == "ready"
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")]:
        for h in [{}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": api_key}]:
            r = httpx.request(method, server.base + path, headers=h, json={"prompt": "hi"})
            assert r.status_code == 401, (path, h, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    models = httpx.get(server.url + "/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


LONG = "one two three four five six seven eight " * 200

BAD = [
    # (id, route, body (dict -> JSON, bytes -> raw), status, param)
    ("malformed_json", "completions", b'{"prompt": "hi", ', 400, None),
    ("not_an_object", "completions", b"[1, 2]", 400, None),
    ("missing_prompt", "completions", {"max_tokens": 4}, 400, "prompt"),
    ("missing_messages", "chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("empty_messages", "chat/completions", {"messages": []}, 400, "messages"),
    ("bad_role", "chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("prompt_wrong_type", "completions", {"prompt": 123}, 400, "prompt"),
    ("max_tokens_string", "completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens_zero", "completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens_negative", "chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
     400, "max_tokens"),
    ("max_tokens_beyond_context", "completions", {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("prompt_beyond_context", "completions", {"prompt": LONG, "max_tokens": 4}, 400, "prompt"),
    ("chat_beyond_context", "chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("token_ids_outside_vocab", "completions", {"prompt": [5, 999999], "max_tokens": 2}, 400, "prompt"),
    ("unknown_model", "completions", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("n_beyond_limit", "completions", {"prompt": "hi", "n": 100, "temperature": 1}, 400, "n"),
    ("logprobs_beyond_limit", "completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs_beyond_limit", "chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ("temperature_out_of_range", "completions", {"prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("top_p_zero", "completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("too_many_stops", "completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stream_wrong_type", "completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("oversized_body", "completions", {"prompt": "x" * 70000}, 413, None),
    ("bad_timeout_header", "completions", {"prompt": "hi", "max_tokens": 2, "_header": "abc"}, 400,
     "X-Request-Timeout"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_4xx_naming_the_field(server, headers, case):
    _, route, body, status, param = case
    h = dict(headers)
    if isinstance(body, dict) and "_header" in body:
        body = dict(body)
        h["X-Request-Timeout"] = body.pop("_header")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/{route}", headers={**h, "Content-Type": "application/json"}, content=content,
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and err["type"]
    if param:
        assert param.split(".")[0].lower() in err["message"].lower()


def test_official_openai_client_works_unchanged(server):
    import openai

    client = openai.OpenAI(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    c = client.completions.create(model="tiny", prompt="the cat sat on", max_tokens=8, temperature=0,
                                  logprobs=2, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 8 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + 8
    assert len(c.choices[0].logprobs.token_logprobs) == 8
    assert all(len(t) >= 1 for t in c.choices[0].logprobs.top_logprobs)
    again = client.completions.create(model="tiny", prompt="the cat sat on", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == c.choices[0].text  # greedy is deterministic

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is 2+3?"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == len(chat.choices[0].logprobs.content) <= 6
    # The chat template was applied: the prompt counts the ChatML wrapper tokens, not just the text.
    plain = client.completions.create(model="tiny", prompt="What is 2+3?", max_tokens=1)
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens

    text, n_chunks = "", 0
    for chunk in client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text
        n_chunks += 1
    assert n_chunks >= 2 and text
    ref = client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert text == ref.choices[0].text  # streamed deltas add up to the non-streamed text

    parts, usage = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
    assert usage is not None and 1 <= usage.completion_tokens <= 10

    # Sampling parameters: seeded sampling repeats; n gives n choices; stop strings cut the text.
    kw = dict(model="tiny", prompt="a b c", max_tokens=10, temperature=1.0, top_p=0.9, seed=7,
              presence_penalty=0.5, frequency_penalty=0.5, extra_body={"top_k": 20, "repetition_penalty": 1.1})
    s1, s2 = client.completions.create(**kw), client.completions.create(**kw)
    assert s1.choices[0].text == s2.choices[0].text
    multi = client.completions.create(model="tiny", prompt=["x y", "p q"], n=2, max_tokens=4, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert len(multi.choices) == 4 and multi.usage.completion_tokens == 16
    full = ref.choices[0].text
    if len(full) > 3:
        stop = full[2:4]
        cut = client.completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
        assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_raw_sse_stream_ends_with_done_and_counts_tokens(server, headers):
    body = {"prompt": "count", "max_tokens": 9, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/completions", headers=headers, json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert payloads[-1]["usage"]["completion_tokens"] == 9
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


def test_echo_with_logprobs_scores_the_prompt(server, headers):
    """What lm-eval's local-completions does for loglikelihood tasks."""
    r = httpx.post(server.url + "/completions", headers=headers, timeout=60,
                   json={"prompt": "the quick brown fox", "max_tokens": 1, "echo": True, "logprobs": 1,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert ch["text"].startswith("the quick brown fox")
    lp = ch["logprobs"]["token_logprobs"]
    assert len(lp) == prompt_tokens + 1 and lp[0] is None and all(isinstance(x, float) for x in lp[1:])


async def _stream(client: httpx.AsyncClient, url: str, headers: dict, max_tokens: int) -> tuple[int, int, str]:
    body = {"prompt": "load test prompt", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.8, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, headers=headers, json=body) as r:
        if r.status_code != 200:
            return r.status_code, 0, (await r.aread()).decode()
        usage, text, last = None, "", ""
        async for ln in r.aiter_lines():
            if not ln:
                continue
            last = ln
            if ln != "data: [DONE]":
                p = json.loads(ln[6:])
                usage = p.get("usage") or usage
                text += "".join(c.get("text", "") for c in p.get("choices", []))
        return r.status_code, usage["completion_tokens"] if usage and last == "data: [DONE]" else -1, text


def test_64_concurrent_streams_complete_with_correct_counts(server, headers):
    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*[_stream(client, server.url + "/completions", headers, 16) for _ in range(64)])

    results = asyncio.run(main())
    assert [s for s, _, _ in results] == [200] * 64, [r for r in results if r[0] != 200][:3]
    assert [n for _, n, _ in results] == [16] * 64


def test_overload_gets_503_at_once_not_a_pile_up(server, headers, scrape):
    """Capacity is 16 slots + 56 queued = 72: of 110 simultaneous requests some must be refused."""
    async def one(client):
        t = time.monotonic()
        r = await client.post(server.url + "/completions", headers=headers,
                              json={"prompt": "x", "max_tokens": 120, "ignore_eos": True})
        return r.status_code, time.monotonic() - t, r

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*[one(client) for _ in range(110)])

    results = asyncio.run(main())
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, set(codes)
    assert codes.count(503) >= 110 - 72 - 4 and codes.count(200) >= 60
    refused = [r for c, _, r in results if c == 503]
    assert refused[0].headers.get("retry-after") == "1"
    assert refused[0].json()["error"]["type"] == "overloaded_error"
    # Refusals come back while admitted requests are still decoding.
    assert max(t for c, t, _ in results if c == 503) < max(t for c, t, _ in results if c == 200)
    assert scrape(server, "llmray_rejected_requests_total") >= codes.count(503)


def test_request_timeout_gets_504_and_frees_the_slot(server, headers, scrape, wait_for):
    r = httpx.post(server.url + "/completions", headers={**headers, "X-Request-Timeout": "0.05"}, timeout=60,
                   json={"prompt": "slow", "max_tokens": 200, "ignore_eos": True})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "timeout_error"
    wait_for(lambda: scrape(server, "llmray_requests_in_flight") == 0, 60, "in-flight requests to drain")
    wait_for(lambda: scrape(server, "llmray_engine_unfinished_requests") == 0, 60, "engine to drop the request")


def test_client_disconnect_mid_stream_frees_the_engine_slot(server, headers, scrape, wait_for):
    before = scrape(server, "llmray_request_errors_total")
    body = {"prompt": "go on", "max_tokens": 230, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/completions", headers=headers, json=body, timeout=120) as r:
        got = 0
        for ln in r.iter_lines():
            got += bool(ln)
            if got >= 3:
                break  # leave mid-stream: the connection is closed here
    wait_for(lambda: scrape(server, "llmray_requests_in_flight") == 0, 60, "the replica to release the slot")
    wait_for(lambda: scrape(server, "llmray_engine_unfinished_requests") == 0, 60, "vLLM to abort the request")
    assert scrape(server, "llmray_request_errors_total") >= before + 1


def test_metrics_expose_latency_throughput_and_queue(server, headers, scrape):
    httpx.post(server.url + "/completions", headers=headers, timeout=60,
               json={"prompt": "metrics", "max_tokens": 8, "ignore_eos": True})
    for name in ["llmray_time_to_first_token_seconds_count", "llmray_time_per_output_token_seconds_count",
                 "llmray_e2e_request_latency_seconds_count", "llmray_generation_tokens_total",
                 "llmray_prompt_tokens_total", "llmray_requests_total"]:
        assert scrape(server, name) > 0, name
    text = httpx.get(server.base + "/metrics", headers=headers).text
    for name in ["llmray_queue_length", "llmray_generation_tokens_per_second", "llmray_spec_decode_acceptance_rate",
                 "llmray_requests_in_flight"]:
        assert name in text
