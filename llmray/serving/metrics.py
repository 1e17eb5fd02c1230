"""Prometheus metrics of a serving replica: requests, errors, TTFT, TPOT, tokens/s, queue, spec-decode acceptance."""

from __future__ import annotations

import time
from collections import deque


class ServingMetrics:
    """Per-replica metrics in their own registry, rendered by the replica's /metrics route."""

    def __init__(self, model: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        tpot = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
        L = ["model"]
        self.model = model
        self.requests = Counter("llmray_requests", "HTTP requests by route and status", L + ["route", "status"],
                                registry=r)
        self.errors = Counter("llmray_request_errors", "Requests answered with an error, by type",
                              L + ["route", "type"], registry=r)
        self.rejected = Counter("llmray_rejected_requests", "Requests refused before the engine (queue full, draining)",
                                L + ["reason"], registry=r)
        self.ttft = Histogram("llmray_time_to_first_token_seconds", "Time to first token", L, buckets=lat, registry=r)
        self.tpot = Histogram("llmray_time_per_output_token_seconds", "Mean time per output token after the first", L,
                              buckets=tpot, registry=r)
        self.e2e = Histogram("llmray_e2e_request_latency_seconds", "End-to-end request latency", L, buckets=lat,
                             registry=r)
        self.prompt_tokens = Counter("llmray_prompt_tokens", "Prompt tokens processed", L, registry=r)
        self.generation_tokens = Counter("llmray_generation_tokens", "Tokens generated", L, registry=r)
        self.tokens_per_s = Gauge("llmray_generation_tokens_per_second", "Generated tokens/s over the last 10 s", L,
                                  registry=r)
        self.in_flight = Gauge("llmray_requests_in_flight", "Requests admitted and not finished", L, registry=r)
        self.seqs_in_flight = Gauge("llmray_sequences_in_flight",
                                    "Sequences admitted and not finished (prompts x n per request)", L, registry=r)
        self.prefix_queries = Counter("llmray_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      L, registry=r)
        self.prefix_hits = Counter("llmray_prefix_cache_hits", "Prompt tokens found in the prefix cache", L,
                                   registry=r)
        self.prefix_hit_rate = Gauge("llmray_prefix_cache_hit_rate", "Prefix-cache hits / queries (cumulative)", L,
                                     registry=r)
        self.queue_length = Gauge("llmray_queue_length", "Admitted requests waiting for an engine slot", L, registry=r)
        self.unfinished = Gauge("llmray_engine_unfinished_requests",
                                "Requests the engine holds (running or waiting), read at scrape time", L, registry=r)
        self.running = Gauge("llmray_engine_running_requests", "Requests the engine is decoding", L, registry=r)
        self.spec_draft = Counter("llmray_spec_decode_draft_tokens", "Speculative tokens proposed", L, registry=r)
        self.spec_accepted = Counter("llmray_spec_decode_accepted_tokens", "Speculative tokens accepted", L, registry=r)
        self.spec_rate = Gauge("llmray_spec_decode_acceptance_rate",
                               "Accepted / proposed speculative tokens (cumulative)", L, registry=r)
        self._window: deque[tuple[float, int]] = deque()
        self._window_sum = 0  # tokens in `_window`, kept as a running sum: O(1) per call
        self._drafted = self._accepted = 0
        self._queries = self._hits = 0

    def observe_tokens(self, n: int) -> None:
        """Count `n` generated tokens and refresh the 10-second tokens/s gauge."""
        if n <= 0:
            return
        self.generation_tokens.labels(self.model).inc(n)
        now = time.monotonic()
        self._window.append((now, n))
        self._window_sum += n
        while now - self._window[0][0] > 10.0:
            self._window_sum -= self._window.popleft()[1]
        span = max(1.0, now - self._window[0][0])
        self.tokens_per_s.labels(self.model).set(self._window_sum / span)

    def observe_engine(self, running: int, waiting: int, drafted: int = 0, accepted: int = 0) -> None:
        self.running.labels(self.model).set(running)
        self.queue_length.labels(self.model).set(waiting)
        if drafted:
            self._drafted += drafted
            self._accepted += accepted
            self.spec_draft.labels(self.model).inc(drafted)
            self.spec_accepted.labels(self.model).inc(accepted)
            self.spec_rate.labels(self.model).set(self._accepted / self._drafted)

    def observe_prefix_cache(self, queries: int, hits: int) -> None:
        if queries <= 0:
            return
        self._queries += queries
        self._hits += hits
        self.prefix_queries.labels(self.model).inc(queries)
        self.prefix_hits.labels(self.model).inc(hits)
        self.prefix_hit_rate.labels(self.model).set(self._hits / self._queries)

    def observe_iteration(self, it) -> None:
        """Token counts and latencies from one vLLM engine iteration (IterationStats)."""
        m = self.model
        self.observe_tokens(it.num_generation_tokens)
        for t in it.time_to_first_tokens_iter:
            self.ttft.labels(m).observe(t)
        for fin in it.finished_requests:
            self.e2e.labels(m).observe(fin.e2e_latency)
            self.prompt_tokens.labels(m).inc(fin.num_prompt_tokens)
            if fin.num_generation_tokens > 1:
                self.tpot.labels(m).observe(fin.mean_time_per_output_token)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def stat_logger_factory(metrics: ServingMetrics):
    """A vLLM stat-logger factory feeding engine stats (running, waiting, spec decode) into `metrics`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _EngineStats(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.queued_outside = 0

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if iteration_stats is not None:
                metrics.observe_iteration(iteration_stats)
            if scheduler_stats is None:
                return
            pc = scheduler_stats.prefix_cache_stats
            if pc is not None:
                metrics.observe_prefix_cache(pc.queries, pc.hits)
            spec = scheduler_stats.spec_decoding_stats
            metrics.observe_engine(
                scheduler_stats.num_running_reqs,
                scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                spec.num_draft_tokens if spec else 0,
                spec.num_accepted_tokens if spec else 0,
            )

        def log_engine_initialized(self):
            pass

    return lambda vllm_config, engine_index=0: _EngineStats(vllm_config, engine_index)


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels} value` lines -> {"name{labels}": value}; used by tests and the benchmark."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(parsed: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in parsed.items() if k == name or k.startswith(name + "{"))
