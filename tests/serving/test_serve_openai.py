"""OpenAI features served by vLLM's OpenAI layer behind llmray's guards, on a real Serve app with the
official openai client: JSON mode, json_schema, forced and streamed tool calls, logit_bias, unknown
arguments, admission by sequences, and the prefix-cache hit rate."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

pytestmark = pytest.mark.timeout(900)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=300)


def _ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_json_mode_parses_on_20_of_20(client):
    """An untrained model under a whitespace-free JSON grammar; answers cut by max_tokens are closed."""
    async def main():
        import openai

        ac = openai.AsyncOpenAI(base_url=client.base_url, api_key=client.api_key, max_retries=0, timeout=300)
        return await asyncio.gather(*[ac.chat.completions.create(
            model="tiny", messages=_ask(f"Describe item {i} as JSON"), max_tokens=48, temperature=1.0, seed=i,
            response_format={"type": "json_object"}) for i in range(20)])

    outs = asyncio.run(main())
    parsed = [json.loads(o.choices[0].message.content) for o in outs]
    assert len(parsed) == 20 and all(isinstance(p, dict) for p in parsed)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=_ask("json please"), max_tokens=32, stream=True, seed=1,
        response_format={"type": "json_object"}) if c.choices)
    assert isinstance(json.loads(streamed), dict)


def test_json_schema_output_validates(client):
    import jsonschema

    for seed in range(5):
        out = client.chat.completions.create(
            model="tiny", messages=_ask("A person as JSON"), max_tokens=120, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
        assert out.choices[0].finish_reason == "stop"


def test_required_tool_choice_returns_parseable_calls_of_declared_functions(client):
    """One call per answer (parallel_tool_calls=False), then parallel calls (the default) cut by
    max_tokens: an untrained model never closes an open-ended array of calls, and vLLM drops such an
    answer (no calls, no content); llmray closes it, so every call it returns parses, streamed too."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=_ask("What is the weather in Paris?"),
                                             tools=TOOLS, tool_choice="required", max_tokens=120, seed=seed,
                                             parallel_tool_calls=False)
        calls = out.choices[0].message.tool_calls
        assert calls and out.choices[0].finish_reason == "tool_calls", out.choices[0]
        for call in calls:
            assert call.function.name in schemas
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=_ask("Weather in Paris, and add 2 and 3?"),
                                             tools=TOOLS, tool_choice="required", max_tokens=40, seed=seed,
                                             temperature=1.0)
        ch = out.choices[0]
        print("required, parallel, max_tokens 40:", ch.finish_reason, [(c.function.name, c.function.arguments)
                                                                     for c in ch.message.tool_calls or []])
        assert ch.finish_reason == "length" and ch.message.tool_calls, ch
        assert all(c.function.name in schemas and isinstance(json.loads(c.function.arguments), dict)
                   for c in ch.message.tool_calls), ch.message.tool_calls
        assert not getattr(ch, "token_ids", None)  # llmray's own read of the tokens is not returned
    args, finish = {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=_ask("Weather in Paris?"), tools=TOOLS,
                                                tool_choice="required", max_tokens=40, stream=True, seed=0):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    print("required, parallel, streamed:", finish, args)
    assert finish == "length" and args and all(isinstance(json.loads(a), dict) for a in args.values()), args


def test_named_tool_choice_calls_that_function_also_streamed(client):
    import jsonschema

    choice = {"type": "function", "function": {"name": "add"}}
    out = client.chat.completions.create(model="tiny", messages=_ask("add 2 and 3"), tools=TOOLS,
                                         tool_choice=choice, max_tokens=60)
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])
    name, args = None, ""
    for chunk in client.chat.completions.create(model="tiny", messages=_ask("add 2 and 3"), tools=TOOLS,
                                                tool_choice=choice, max_tokens=60, stream=True):
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
    assert name == "add"
    jsonschema.validate(json.loads(args), TOOLS[1]["function"]["parameters"])


def test_logit_bias_makes_the_token_greedy(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    target = tok.encode(" cat")[0] if len(tok.encode(" cat")) == 1 else 300
    base = client.completions.create(model="tiny", prompt="the dog", max_tokens=4, temperature=0, logprobs=1)
    out = client.completions.create(model="tiny", prompt="the dog", max_tokens=4, temperature=0,
                                    logit_bias={str(target): 100}, extra_body={"return_token_ids": True})
    assert out.choices[0].token_ids == [target] * 4, (out.choices[0].text, base.choices[0].text)


def test_vllm_sampling_extras_and_echo_work(client):
    out = client.completions.create(model="tiny", prompt="a b", max_tokens=6, temperature=0.8, seed=3,
                                    extra_body={"min_tokens": 6, "ignore_eos": True, "top_k": 5})
    assert out.usage.completion_tokens == 6
    echo = client.completions.create(model="tiny", prompt="a b", max_tokens=2, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("a b")
    choice = client.chat.completions.create(model="tiny", messages=_ask("yes or no?"), max_tokens=5,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")


def test_omitted_max_tokens_defaults_to_the_limit(client):
    """Chat: limits.default_max_tokens (40 in conftest); completions: OpenAI's (and vLLM's) 16."""
    out = client.chat.completions.create(model="tiny", messages=_ask("a"), extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 40
    out = client.completions.create(model="tiny", prompt="a", temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16


def test_unknown_argument_is_a_400_naming_it(server, headers):
    for route, body in [("completions", {"prompt": "hi", "max_tokens": 2}),
                        ("chat/completions", {"messages": _ask("hi"), "max_tokens": 2})]:
        r = httpx.post(f"{server.url}/{route}", headers=headers, json={**body, "frobnicate_level": 3}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "frobnicate_level" and "frobnicate_level" in err["message"]


def test_admission_counts_sequences_not_requests(server, headers, scrape):
    """Capacity is 16 slots + 56 queued = 72 sequences: 32 prompts x n=8 (256) can never fit; 8 x 8 = 64
    fits alone, and two of them at once overshoot, so one is refused with a 503."""
    big = {"prompt": ["p"] * 32, "n": 8, "max_tokens": 4, "temperature": 1.0}
    r = httpx.post(server.url + "/completions", headers=headers, json=big, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences", r.text

    fits = {"prompt": ["p"] * 8, "n": 8, "max_tokens": 64, "temperature": 1.0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*[c.post(server.url + "/completions", headers=headers, json=fits)
                                          for _ in range(2)])

    codes = sorted(r.status_code for r in asyncio.run(main()))
    assert codes == [200, 503], codes
    assert scrape(server, "llmray_sequences_in_flight") == 0


def test_prefix_cache_hits_are_in_the_metrics(client, server, scrape):
    system = "You are a careful assistant who answers briefly and well. " * 4
    for q in ("one", "two", "three"):
        client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": system},
                                                               {"role": "user", "content": q}], max_tokens=2)
    assert scrape(server, "llmray_prefix_cache_hits_total") > 0
    assert 0 < scrape(server, "llmray_prefix_cache_hit_rate") <= 1
