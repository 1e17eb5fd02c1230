"""Pure pieces of serving: request schemas, auth, quantization math, gate decision, deployment
options, engine arguments, metrics parsing, and every shipped serving YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmray.config import ConfigError, build, load
from llmray.errors import UserError
from llmray.serving.config import ServeConfig
from llmray.serving.errors import APIError

ROOT = Path(__file__).resolve().parents[2]


def test_requests_parse_into_vllm_models_strictly_and_unknown_arguments_are_named():
    from llmray.serving.openai_layer import parse_request

    with pytest.raises(APIError) as e:
        parse_request(b'{"prompt": "x", "max_tokens": "5"}', "completions")
    assert e.value.status == 400 and e.value.param == "max_tokens"
    with pytest.raises(APIError) as e:
        parse_request(b'{"prompt": "x", "frobnicate": 1}', "completions")
    assert e.value.param == "frobnicate" and "Unrecognized request argument" in e.value.message
    with pytest.raises(APIError) as e:
        parse_request(b"not json", "completions")
    assert e.value.status == 400 and "JSON" in e.value.message
    data, req = parse_request(b'{"prompt": [[1, 2], [3]], "stop": "x", "user": "u", "top_k": 5, "min_tokens": 2,'
                              b' "logit_bias": {"7": 100}, "response_format": {"type": "json_object"}}', "completions")
    assert req.top_k == 5 and req.min_tokens == 2 and req.logit_bias == {"7": 100}
    data, req = parse_request(b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",'
                              b' "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],'
                              b' "stream": true, "stream_options": {"include_usage": true}, "seed": 3}', "chat")
    assert req.tool_choice == "required" and req.seed == 3


def test_guards_count_sequences_and_check_openai_ranges():
    from llmray.serving.config import LimitsConfig
    from llmray.serving.guards import check_request

    lim = LimitsConfig(max_n=8, max_prompts=32)
    assert check_request({"prompt": ["a"] * 32, "n": 8}, "completions", lim) == 256
    assert check_request({"prompt": [1, 2, 3], "n": 2, "best_of": 3}, "completions", lim) == 3
    assert check_request({"messages": [{"role": "user", "content": "x"}], "n": 4}, "chat", lim) == 4
    for body, param in [({"prompt": "x", "temperature": 2.5}, "temperature"), ({"prompt": "x", "top_p": 0}, "top_p"),
                        ({"prompt": "x", "n": 9}, "n"), ({"prompt": ["a"] * 33}, "prompt"),
                        ({"prompt": "x", "stop": list("abcde")}, "stop"),
                        ({"prompt": "x", "max_tokens": 0}, "max_tokens")]:
        with pytest.raises(APIError) as e:
            check_request(body, "completions", lim)
        assert e.value.param == param


def test_json_closing_completes_every_prefix():
    import json

    from llmray.serving.jsonclose import closing

    full = '{"a":[1,-2.5e3,true,{"b":"x\\u00e9y\\"q"},null],"c":{},"d":"","e":false,"f":[]}'
    json.loads(full)
    for i in range(1, len(full) + 1):
        json.loads(full[:i] + closing(full[:i]))


def test_forced_tool_calls_cut_by_max_tokens_are_closed():
    """A `required` answer is a JSON array of {"name", "parameters"}: every prefix closes into calls of
    declared functions only, with arguments that parse; a named call's arguments are closed; the token
    ids llmray asked for are removed; streamed, the last call's arguments get the closing."""
    import json

    from llmray.serving.guards import closing_for
    from llmray.serving.jsonclose import StreamCloser, required_calls

    tools = [{"type": "function", "function": {"name": n}} for n in ("add", "get_weather")]
    how = closing_for({"tools": tools, "tool_choice": "required"}, "chat")
    assert how.kind == "required" and how.declared == {"add", "get_weather"} and how.drop_token_ids
    assert closing_for({"tools": tools, "tool_choice": "required", "stream": True}, "chat").drop_token_ids is False
    assert closing_for({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "add"}}},
                       "chat").kind == "named"
    assert closing_for({"tools": tools, "tool_choice": "auto"}, "chat") is None
    assert closing_for({"response_format": {"type": "json_object"}}, "completions").kind == "json"
    full = '[{"name": "add", "parameters": {"a": 5, "b": 70}}, {"name": "get_weather", "parameters": {"city": "Pa'
    names = []
    for i in range(1, len(full) + 1):
        calls = required_calls(full[:i], how.declared)
        assert all(isinstance(json.loads(c["function"]["arguments"]), dict) for c in calls)
        names.append(tuple(c["function"]["name"] for c in calls))
    assert names[-1] == ("add", "get_weather") and ("add",) in names and names[0] == ()
    assert json.loads(required_calls(full, how.declared)[1]["function"]["arguments"]) == {"city": "Pa"}
    assert required_calls('[{"name": "ad', how.declared) == []  # a name cut short is no declared function

    from llmray.serving.jsonclose import close_choices

    body = {"prompt_token_ids": [1, 2], "choices": [
        {"index": 0, "finish_reason": "length", "token_ids": [7, 8], "message": {"content": "", "tool_calls": []}},
        {"index": 1, "finish_reason": "tool_calls", "token_ids": [9], "message": {"content": None, "tool_calls": [
            {"function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}}]}
    close_choices(body, how, decode=lambda ids: full if ids == [7, 8] else "")
    assert "prompt_token_ids" not in body and all("token_ids" not in ch for ch in body["choices"])
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == ["add", "get_weather"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][1]["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": 2}'
    named = {"choices": [{"finish_reason": "length", "message": {"tool_calls": [
        {"function": {"name": "add", "arguments": '{"a": 12, "b'}}]}}]}
    close_choices(named, closing_for({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "add"}}},
                                     "chat"))
    assert json.loads(named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"a": 12, "b": None}

    closer = StreamCloser(how)

    def ev(delta: dict, fin: str | None = None) -> str:
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}) + "\n\n"

    args = ""
    for e in (ev({"tool_calls": [{"index": 0, "function": {"name": "add", "arguments": '{"a": 5'}}]}),
              ev({"tool_calls": [{"index": 0, "function": {"arguments": ', "b": 7'}}]}), ev({}, "length")):
        for ch in json.loads(closer.event(e)[6:])["choices"]:
            args += "".join(tc["function"].get("arguments") or "" for tc in ch["delta"].get("tool_calls") or [])
    assert json.loads(args) == {"a": 5, "b": 7}


def test_bearer_check_is_exact():
    from llmray.serving.auth import check_bearer, is_public

    check_bearer("Bearer k" * 1, None)  # auth off
    check_bearer("Bearer secret-123", "secret-123")
    check_bearer("bearer secret-123", "secret-123")
    for bad in [None, "", "secret-123", "Bearer secret-12", "Bearer secret-1234", "Basic secret-123"]:
        with pytest.raises(APIError) as e:
            check_bearer(bad, "secret-123")
        assert e.value.status == 401
    assert is_public("/health") and is_public("/ready") and not is_public("/v1/models")
    assert is_public("/api/health", "/api") and not is_public("/api/metrics", "/api")


def test_int8_round_trip_error_is_within_half_a_step():
    import torch

    from llmray.serving.quantize import dequantize_weight, quantize_weight

    w = torch.randn(64, 48) * torch.linspace(0.01, 3.0, 64)[:, None]  # very different channel ranges
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (64, 1)
    err = (dequantize_weight(q, s) - w).abs()
    assert torch.all(err <= s / 2 + 1e-6)  # round-to-nearest: at most half a step per channel
    assert q.abs().amax(dim=1).eq(127).all()  # each channel uses its full range


def test_quantization_config_is_compressed_tensors_w8a8():
    from llmray.serving.quantize import quantization_config

    c = quantization_config(["lm_head"])
    assert c["quant_method"] == "compressed-tensors" and c["format"] == "int-quantized"
    g = c["config_groups"]["group_0"]
    assert g["weights"]["strategy"] == "channel" and g["weights"]["num_bits"] == 8
    assert g["input_activations"]["dynamic"] is True and g["input_activations"]["strategy"] == "token"
    assert c["ignore"] == ["lm_head"]


def _row(**kw):
    row = {"ppl": 10.2, "ppl_original": 10.0, "ppl_increase": 0.02, "accuracy": 0.5, "accuracy_original": 0.52,
           "accuracy_drop": 0.02, "size_ratio": 0.3, "speedup": {"1": 1.0, "8": 0.95}}
    return {**row, **kw}


def test_quantize_verdict_names_each_broken_promise():
    from llmray.serving.quantize import verdict

    args = dict(max_ppl_increase=0.05, max_accuracy_drop=0.1, max_size_ratio=0.6, min_speedup=1.1, concurrency=8)
    assert verdict(_row(), **args) == []  # smaller as promised, quality holds: publish
    assert verdict(_row(size_ratio=0.9, speedup={"8": 1.3}), **args) == []  # not smaller, but faster
    [r] = verdict(_row(ppl=10.8, ppl_increase=0.08), **args)
    assert "perplexity rose 8.00%" in r and "max_ppl_increase=0.05" in r
    [r] = verdict(_row(accuracy=0.3, accuracy_drop=0.22), **args)
    assert "accuracy fell 0.220" in r
    [r] = verdict(_row(size_ratio=0.9), **args)
    assert "size ratio 0.900 > max_size_ratio=0.6" in r and "0.95x < min_speedup=1.1" in r


def test_quantize_config_errors_name_the_key():
    from llmray.serving.quantize import check_group_size
    from llmray.stages.quantize import QuantizeConfig

    with pytest.raises(ConfigError, match="schemes"):
        build(QuantizeConfig, {"schemes": ["int3"]})
    with pytest.raises(ConfigError, match="serving_concurrency"):
        build(QuantizeConfig, {"serving_concurrency": 4, "concurrencies": [1, 8]})
    with pytest.raises(UserError, match="quantize.group_size: 128 does not divide the model's hidden_size"):
        check_group_size({"hidden_size": 192, "intermediate_size": 512}, 128)
    check_group_size({"hidden_size": 192, "intermediate_size": 512}, 64)


def test_gate_enables_only_what_pays():
    from llmray.serving.gates import decide

    d = decide(100.0, {"ngram": 180.0, "quantized": 104.0}, 1.05)
    assert d["enabled"] == "ngram" and d["speedups"] == {"ngram": 1.8, "quantized": 1.04}
    assert decide(100.0, {"ngram": 90.0}, 1.05)["enabled"] is None


def test_deployment_options_bound_the_queue_and_autoscale():
    from llmray.serving.app import deployment_options

    cfg = build(ServeConfig, {"engine": {"max_num_seqs": 8}, "limits": {"max_queue": 24},
                              "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    o = deployment_options(cfg)
    assert o["max_ongoing_requests"] > 8 + 24  # the replica, not the proxy, refuses the overflow
    assert o["max_queued_requests"] == 128
    assert o["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in o
    fixed = deployment_options(build(ServeConfig, {}))
    assert fixed["num_replicas"] == 1


def test_engine_kwargs_and_speculative_config(tiny_model_dir, tmp_path):
    from llmray.vllm_engine import EngineConfig, engine_kwargs

    kw = engine_kwargs(str(tiny_model_dir), build(EngineConfig, {"speculative": {"method": "ngram"}}))
    assert kw["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 4,
                                        "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert "speculative_config" not in engine_kwargs(str(tiny_model_dir), EngineConfig())
    with pytest.raises(ConfigError, match="speculative.draft_model"):
        build(EngineConfig, {"speculative": {"method": "draft"}})
    with pytest.raises(UserError, match="draft_model"):
        engine_kwargs(str(tiny_model_dir),
                      build(EngineConfig, {"speculative": {"method": "draft", "draft_model": str(tmp_path)}}))


def test_worker_process_sets_vllm_layout(tiny_model_dir):
    from llmray.vllm_engine import EngineConfig, engine_env, engine_kwargs

    inproc = EngineConfig()
    assert engine_env(inproc)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_kwargs(str(tiny_model_dir), inproc)["distributed_executor_backend"] == "uni"
    separate = build(EngineConfig, {"worker_process": "separate"})
    assert engine_env(separate)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert "distributed_executor_backend" not in engine_kwargs(str(tiny_model_dir), separate)
    with pytest.raises(ConfigError, match="worker_process"):
        build(EngineConfig, {"worker_process": "third"})


def test_bad_model_dir_fails_before_any_work(tmp_path):
    from llmray.serving.app import build_app

    with pytest.raises(UserError, match="model: directory not found"):
        build_app(build(ServeConfig, {"model": str(tmp_path / "nope")}))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        build_app(build(ServeConfig, {"model": str(tmp_path)}))


def test_serve_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="limits.max_queue"):
        build(ServeConfig, {"limits": {"max_queue": -1}})
    with pytest.raises(ConfigError, match="deployment.autoscaling.max_replicas"):
        build(ServeConfig, {"deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match="gate.quantized_model"):
        build(ServeConfig, {"gate": {"candidates": ["quantized"]}})
    with pytest.raises(ConfigError, match="ingress"):
        build(ServeConfig, {"ingress": "sidecar"})
    with pytest.raises(ConfigError, match="ingress.*max_replicas=1"):
        build(ServeConfig, {"ingress": "direct", "deployment": {"autoscaling": {"max_replicas": 2}}})


def test_direct_ingress_env_starts_replica_ports_at_the_configured_port():
    from llmray.serving.server import direct_ingress_env

    env = direct_ingress_env(18080)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "18080"
    assert int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) > 18080


def test_auto_ingress_is_direct_only_for_one_replica_on_a_cluster_with_direct_ingress(monkeypatch):
    from llmray.serving.server import resolve_ingress

    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    one = build(ServeConfig, {})
    assert one.ingress == "auto"
    assert resolve_ingress(one, starts_cluster=True).ingress == "direct"  # `llmray serve` on a laptop
    assert resolve_ingress(one).ingress == "proxy"  # a cluster started without the flag
    scaled = build(ServeConfig, {"deployment": {"autoscaling": {"max_replicas": 3}}})
    assert resolve_ingress(scaled, starts_cluster=True).ingress == "proxy"  # needs the load balancer
    monkeypatch.setenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    assert resolve_ingress(one).ingress == "direct" and resolve_ingress(scaled).ingress == "proxy"
    assert resolve_ingress(build(ServeConfig, {"ingress": "proxy"}), starts_cluster=True).ingress == "proxy"


def test_metrics_parse_and_sum():
    from llmray.serving.metrics import ServingMetrics, metric_sum, parse_prometheus

    m = ServingMetrics("m")
    m.observe_tokens(10)
    for _ in range(1000):  # the 10-second window keeps a running sum
        m.observe_tokens(1)
    m.observe_engine(running=3, waiting=2, drafted=8, accepted=6)
    m.observe_engine(running=1, waiting=0, drafted=2, accepted=0)
    p = parse_prometheus(m.render().decode())
    assert metric_sum(p, "llmray_generation_tokens_total") == 1010
    assert metric_sum(p, "llmray_generation_tokens_per_second") == pytest.approx(1010, rel=0.01)
    assert metric_sum(p, "llmray_queue_length") == 0 and metric_sum(p, "llmray_engine_running_requests") == 1
    assert metric_sum(p, "llmray_spec_decode_acceptance_rate") == pytest.approx(0.6)


def test_loadgen_merge_pools_rounds():
    """Two rounds of one load: rates over the summed wall time, percentiles over all requests."""
    from llmray.serving.loadgen import _report, merge, percentile

    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 99) == 4.0
    a = _report(8, 4, 2.0, 100, [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0])
    b = _report(8, 5, 3.0, 50, [0.5, 0.6, 0.7, 0.8], [2.0, 2.0, 2.0, 2.0])  # one request failed
    m = merge([a, b])
    assert m["requests"] == 9 and m["errors"] == 1 and m["wall_s"] == 5.0
    assert m["out_tok_s"] == pytest.approx(150 / 5.0) and m["req_s"] == pytest.approx(8 / 5.0)
    assert m["ttft_p50_ms"] == pytest.approx(400.0) and m["e2e_p99_ms"] == pytest.approx(2000.0)


def test_stream_batches_hold_tokens_but_never_the_end():
    """Streamed outputs leave in batches at most every flush window, the first at once; the batch
    that reaches the end leaves as soon as the end arrives, not at the next window."""
    import asyncio
    import time

    from llmray.serving.stream import batches as _batches

    async def run(flush_s: float, feed: list[tuple[float, object]]) -> list[tuple[float, list]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def producer():
            for at, item in feed:
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                queue.put_nowait(item)

        t0 = time.monotonic()
        task = asyncio.create_task(producer())
        out = [(time.monotonic() - t0, items) async for items in _batches(queue, flush_s)]
        await task
        return out

    # tokens every 20 ms, the end 10 ms after the last; a 1 s window
    feed = [(0.02 * k, (0, k)) for k in range(5)] + [(0.09, None)]
    out = asyncio.run(run(1.0, feed))
    assert [items for _, items in out] == [[(0, 0)], [(0, 1), (0, 2), (0, 3), (0, 4), None]]
    assert out[1][0] < 0.5, f"the end was held until {out[1][0]:.3f} s"
    # an exception ends the stream the same way
    err = RuntimeError("engine died")
    out = asyncio.run(run(1.0, [(0.0, (0, 0)), (0.02, (0, 1)), (0.04, err)]))
    assert out[-1][1][-1] is err and out[-1][0] < 0.5
    # window 0: whatever is ready, at once
    out = asyncio.run(run(0.0, [(0.0, (0, 0)), (0.05, (0, 1)), (0.1, None)]))
    assert [items for _, items in out] == [[(0, 0)], [(0, 1)], [None]]
    # a short window: tokens held no longer than it
    out = asyncio.run(run(0.05, [(0.01 * k, (0, k)) for k in range(20)] + [(0.2, None)]))
    assert sum(len(items) for _, items in out) == 21 and 3 <= len(out) <= 8


def test_stat_logger_reads_vllm_scheduler_stats():
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from llmray.serving.metrics import ServingMetrics, stat_logger_factory

    m = ServingMetrics("m")
    logger = stat_logger_factory(m)(None, 0)
    spec = SpecDecodingStats.new(num_spec_tokens=4)
    spec.observe_draft(num_draft_tokens=4, num_accepted_tokens=3)
    logger.record(SchedulerStats(num_running_reqs=2, num_waiting_reqs=5, spec_decoding_stats=spec), None)
    assert m._accepted == 3 and m._drafted == 4


def test_shipped_serving_configs_load():
    from ray.serve.schema import ServeDeploySchema

    from llmray.stages.quantize import QuantizeConfig

    for path in sorted((ROOT / "jobs/configs/serve").glob("*.yaml")):
        load(ServeConfig, path)
    for path in sorted((ROOT / "jobs/configs/quantize").glob("*.yaml")):
        load(QuantizeConfig, path)
    serve_yamls = sorted((ROOT / "serving").glob("*.yaml"))
    assert serve_yamls
    import yaml

    for path in serve_yamls:
        data = yaml.safe_load(path.read_text())
        schema = (ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate")
                  else ServeDeploySchema.parse_obj(data))
        for app in schema.applications:
            assert app.import_path == "llmray.serving.app:app_builder"
            cfg = build(ServeConfig, app.args)
            assert cfg.deployment.max_queued_requests >= 1
            assert cfg.deployment.autoscaling.max_replicas > cfg.deployment.autoscaling.min_replicas
