"""The Ray Serve application: one FastAPI ingress deployment (OpenAI routes, auth, admission
control, timeouts, metrics) wrapping a vLLM `AsyncLLM` per replica.

`build_app(cfg)` returns the bound Serve application; `app_builder(args)` is the `import_path`
target of the Serve YAMLs in `serving/` (`serve run serving/tiny_cpu.yaml`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmray.config import build, to_dict
from llmray.serving import generate as gen
from llmray.serving.auth import check_bearer, resolve_api_key
from llmray.serving.config import ServeConfig
from llmray.vllm_engine import engine_env
from llmray.serving.schemas import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from llmray.serving.stream import batches, pump

log = logging.getLogger(__name__)
DEPLOYMENT = "LLMServer"

app = FastAPI(title="llmray", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(_request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
    err = APIError(e.status_code, str(e.detail), None, type="invalid_request_error")
    return JSONResponse(err.body(), status_code=e.status_code)


@app.exception_handler(Exception)
async def _internal_error(_request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), 500)


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class LLMServer:
    """One replica: a vLLM engine plus admission control (engine slots + a bounded queue)."""

    async def __init__(self, cfg: dict[str, Any]):
        from transformers import AutoTokenizer

        from llmray.vllm_engine import build_engine
        from llmray.serving.metrics import ServingMetrics, stat_logger_factory

        self.cfg: ServeConfig = build(ServeConfig, cfg)
        self.name = self.cfg.name()
        self.api_key = resolve_api_key(self.cfg.api_key, self.cfg.api_key_env)
        self.metrics = ServingMetrics(self.name)
        self.tok = AutoTokenizer.from_pretrained(self.cfg.model)
        self.engine = build_engine(self.cfg.model, self.cfg.engine, self.name,
                                   stat_loggers=[stat_logger_factory(self.metrics)])
        self.vocab = self.engine.model_config.get_vocab_size()
        self.max_model_len = self.cfg.engine.max_model_len
        self.capacity = self.cfg.engine.max_num_seqs + self.cfg.limits.max_queue
        self.active = 0
        self.created = int(time.time())

    # ---- health, auth, admission -------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's replica health check: an errored engine makes Serve replace the replica."""
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine is dead: {self.engine.dead_error}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def pid(self) -> int:
        """The replica's process id (for operators and the fault-injection test)."""
        import os

        return os.getpid()

    def _auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.api_key)

    def _admit(self, route: str) -> None:
        if self.active >= self.capacity:
            self.metrics.rejected.labels(self.name, "queue_full").inc()
            self._count(route, 503, "overloaded")
            raise APIError(503, f"server is at capacity ({self.capacity} requests in flight); retry later",
                           None, type="overloaded_error", code="server_overloaded", headers={"Retry-After": "1"})
        self.active += 1
        self.metrics.in_flight.labels(self.name).set(self.active)

    def _release(self) -> None:
        self.active -= 1
        self.metrics.in_flight.labels(self.name).set(self.active)

    def _count(self, route: str, status: int, err_type: str | None = None) -> None:
        self.metrics.requests.labels(self.name, route, str(status)).inc()
        if err_type:
            self.metrics.errors.labels(self.name, route, err_type).inc()

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", None)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", None)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.name}'",
                           "model", code="model_not_found")

    # ---- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> Response:
        if self.engine.errored:
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return JSONResponse({"status": "ready", "model": self.name, "in_flight": self.active})

    @app.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        self._auth(request)
        self.metrics.unfinished.labels(self.name).set(self.engine.get_num_unfinished_requests())
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "llmray", "max_model_len": self.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions", CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat", ChatCompletionRequest)

    # ---- the request path ------------------------------------------------------------------------

    async def _serve(self, request: Request, route: str, cls) -> Response:
        try:
            self._auth(request)
            req = parse_body(await self._body(request), cls)
            self._check_model(req.model)
            plan_fn = gen.plan_chat if cls is ChatCompletionRequest else gen.plan_completion
            try:
                plan = plan_fn(req, self.tok, self.vocab, self.max_model_len, self.cfg.limits)
            except ValueError as e:  # vLLM's SamplingParams rejected a combination of parameters
                raise APIError(400, f"invalid sampling parameters: {e}", None) from None
            timeout_s = self._timeout_s(request)
        except APIError as e:
            self._count(route, e.status, e.type)
            raise
        self._admit(route)  # raises 503 when full
        want_lp = (req.logprobs is not None) if cls is CompletionRequest else bool(req.logprobs)
        start = time.monotonic()
        deadline = start + timeout_s
        acc = gen.Accumulator(plan, self.tok)
        stream = gen.run_plan(self.engine, plan)
        released = False
        try:
            if not req.stream:
                try:
                    async with asyncio.timeout(timeout_s):
                        first = None
                        async for i, out in stream:
                            acc.add(i, out)
                            if first is None and acc.completion_tokens:
                                first = time.monotonic()
                except TimeoutError:
                    raise self._timeout(route, timeout_s) from None
                self._observe(start, first, acc)
                self._count(route, 200)
                self.metrics.prompt_tokens.labels(self.name).inc(acc.prompt_tokens)
                return JSONResponse(gen.final_response(acc, plan, self.name, want_lp))
            # Streaming: wait for the first output before sending headers, so that a timeout or
            # an engine error still gets a real status code.
            try:
                async with asyncio.timeout(timeout_s):
                    first_item = await anext(stream, None)
            except TimeoutError:
                raise self._timeout(route, timeout_s) from None
            released = True
            return StreamingResponse(self._sse(route, plan, acc, stream, first_item, start, deadline, want_lp, req),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - engine failure: 500 with an OpenAI error object
            self._count(route, 500, "server_error")
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", None, type="server_error") from None
        finally:
            if not released:
                await stream.aclose()
                self._release()

    def _timeout_s(self, request: Request) -> float:
        """limits.request_timeout_s, or a shorter `X-Request-Timeout: <seconds>` from the client."""
        limit = self.cfg.limits.request_timeout_s
        raw = request.headers.get("x-request-timeout")
        if raw is None:
            return limit
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise APIError(400, f"X-Request-Timeout must be a positive number of seconds, got {raw!r}",
                           "X-Request-Timeout")
        return min(value, limit)

    def _timeout(self, route: str, timeout_s: float) -> APIError:
        self._count(route, 504, "timeout")
        return APIError(504, f"request did not finish within {timeout_s:g}s and was aborted", None,
                        type="timeout_error", code="request_timeout")

    def _observe(self, start: float, first: float | None, acc: gen.Accumulator) -> None:
        end = time.monotonic()
        self.metrics.e2e.labels(self.name).observe(end - start)
        self.metrics.observe_tokens(acc.completion_tokens)
        if first is not None:
            self.metrics.ttft.labels(self.name).observe(first - start)
            per_seq = acc.completion_tokens / max(1, len(acc.choices))
            if per_seq > 1:
                self.metrics.tpot.labels(self.name).observe((end - first) / (per_seq - 1))

    async def _sse(self, route, plan, acc, stream, first_item, start, deadline, want_lp, req):
        """SSE events of one streamed request. A pump task reads the engine stream into a queue;
        this generator sends what is ready as one chunk, at most every `stream_flush_ms` (the first
        chunk and the last at once, see `llmray.serving.stream`), so a token costs no Ray hop of its own."""
        first_at = None
        ok = False
        queue: asyncio.Queue = asyncio.Queue()
        pump_task = asyncio.create_task(pump(stream, first_item, queue))
        chunks = batches(queue, self.cfg.stream_flush_ms / 1000.0)
        try:
            head = b""
            if plan.chat:
                head = b"".join(gen.sse({"id": "chatcmpl-" + plan.request_id, "object": "chat.completion.chunk",
                                         "created": plan.created, "model": self.name,
                                         "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                                 for k in range(len(acc.choices)))
            done = False
            while not done:
                try:
                    async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                        items = await anext(chunks)
                except TimeoutError:
                    self._count(route, 504, "timeout")
                    yield (head + gen.sse(APIError(504, "request timed out while streaming and was aborted", None,
                                                   type="timeout_error", code="request_timeout").body())
                           + gen.sse("[DONE]"))
                    ok = True
                    return
                parts = [head]
                head = b""
                for item in items:
                    if item is None:
                        done = True
                        break
                    if isinstance(item, BaseException):
                        raise item
                    i, out = item
                    before = acc.completion_tokens
                    deltas = acc.add(i, out)
                    if first_at is None and acc.completion_tokens:
                        first_at = time.monotonic()
                    self.metrics.observe_tokens(acc.completion_tokens - before)
                    parts.extend(gen.sse(chunk) for chunk in gen.stream_chunks(plan, self.name, deltas, want_lp))
                if done:
                    if req.include_usage():
                        parts.append(gen.sse({"id": ("chatcmpl-" if plan.chat else "cmpl-") + plan.request_id,
                                              "object": "chat.completion.chunk" if plan.chat else "text_completion",
                                              "created": plan.created, "model": self.name, "choices": [],
                                              "usage": acc.usage()}))
                    parts.append(gen.sse("[DONE]"))
                chunk = b"".join(parts)
                if chunk:
                    yield chunk
            ok = True
            self._count(route, 200)
            self.metrics.prompt_tokens.labels(self.name).inc(acc.prompt_tokens)
            end = time.monotonic()
            self.metrics.e2e.labels(self.name).observe(end - start)
            if first_at is not None:
                self.metrics.ttft.labels(self.name).observe(first_at - start)
                per_seq = acc.completion_tokens / max(1, len(acc.choices))
                if per_seq > 1:
                    self.metrics.tpot.labels(self.name).observe((end - first_at) / (per_seq - 1))
        except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
            self._count(route, 500, "server_error")
            log.exception("streaming failed")
            yield gen.sse(APIError(500, f"generation failed: {type(e).__name__}", None, type="server_error").body())
        finally:
            if not ok:  # the client went away mid-stream
                self.metrics.errors.labels(self.name, route, "client_disconnected").inc()
            # A client that went away cancels this generator: stopping the pump and closing the
            # engine stream aborts the vLLM request, which frees its slot and KV cache.
            await chunks.aclose()
            pump_task.cancel()
            try:
                await pump_task
            except BaseException:  # noqa: BLE001 - cancelled, or its error was already reported
                pass
            await stream.aclose()
            self._release()


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options (replicas/autoscaling, concurrency, queue, resources) from the config."""
    dep, auto = cfg.deployment, cfg.deployment.autoscaling
    capacity = cfg.engine.max_num_seqs + cfg.limits.max_queue
    # Let Serve route a few more than the replica admits, so the replica itself answers 503 at
    # once instead of requests piling up in the proxy.
    max_ongoing = dep.max_ongoing_requests or capacity + max(4, capacity // 4)
    opts: dict[str, Any] = dict(
        max_ongoing_requests=max_ongoing,
        max_queued_requests=dep.max_queued_requests,
        ray_actor_options={"num_cpus": dep.num_cpus, "num_gpus": dep.num_gpus,
                           "runtime_env": {"env_vars": engine_env(cfg.engine)}},
        graceful_shutdown_timeout_s=dep.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=dep.health_check_period_s,
        health_check_timeout_s=dep.health_check_timeout_s,
    )
    if auto.min_replicas == auto.max_replicas:
        opts["num_replicas"] = auto.min_replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
            "initial_replicas": max(1, auto.min_replicas),
            "target_ongoing_requests": auto.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s, "downscale_delay_s": auto.downscale_delay_s,
        }
    return opts


def build_app(cfg: ServeConfig):
    """The bound Serve application for `cfg` (validated model directory, resolved options)."""
    from llmray.models.model_dir import check_model_dir
    from llmray.vllm_engine import engine_kwargs

    check_model_dir(cfg.model)
    engine_kwargs(cfg.model, cfg.engine)  # fails early on a bad draft model
    return LLMServer.options(**deployment_options(cfg)).bind(to_dict(cfg))


def app_builder(args: dict[str, Any]):
    """`import_path: llmray.serving.app:app_builder` in a Serve YAML; `args` is a ServeConfig mapping."""
    return build_app(build(ServeConfig, args))
