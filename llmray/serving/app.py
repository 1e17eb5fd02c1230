"""The Ray Serve application: one FastAPI ingress deployment per replica, with llmray's guards (auth,
body cap, OpenAI's ranges, admission by sequences, timeouts, disconnects, metrics) in front of vLLM's
own OpenAI layer (`OpenAIServingChat`, `OpenAIServingCompletion`, `OpenAIServingModels`, its tool-call
parsers and structured outputs) around a vLLM `AsyncLLM`.

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
from llmray.serving import guards
from llmray.serving.auth import check_bearer, require_key_for_bind
from llmray.serving.config import ServeConfig
from llmray.serving.errors import APIError
from llmray.vllm_engine import engine_env

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
    """One replica: a vLLM engine, vLLM's OpenAI serving classes, and admission control in sequences
    (engine slots + a bounded queue)."""

    async def __init__(self, cfg: dict[str, Any]):
        from llmray.serving import openai_layer
        from llmray.serving.metrics import ServingMetrics, stat_logger_factory
        from llmray.vllm_engine import build_engine

        self.cfg: ServeConfig = build(ServeConfig, cfg)
        self.name = self.cfg.name()
        # The key comes with the deployment's config (resolved where the app was built), never from
        # this replica's own environment: a node without the variable still requires it.
        self.api_key = self.cfg.api_key
        self.metrics = ServingMetrics(self.name)
        self.engine = build_engine(self.cfg.model, self.cfg.engine, self.name,
                                   stat_loggers=[stat_logger_factory(self.metrics)],
                                   **self.cfg.serving_engine_kwargs())
        self.state = await openai_layer.build_state(
            self.engine, openai_layer.frontend_argv(self.cfg.model, self.name, self.cfg))
        self.models = {self.name, *self.cfg.lora.adapters}
        self.capacity = self.cfg.engine.max_num_seqs + self.cfg.limits.max_queue
        self.active = 0  # requests admitted
        self.active_seqs = 0  # sequences admitted (what capacity counts)

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

    def _admit(self, route: str, seqs: int) -> None:
        if seqs > self.capacity:
            self._count(route, 400, "invalid_request_error")
            raise APIError(400, f"request asks for {seqs} sequences (prompts x n); this server holds at most "
                           f"{self.capacity} at once", "n", code="too_many_sequences")
        if self.active_seqs + seqs > self.capacity:
            self.metrics.rejected.labels(self.name, "queue_full").inc()
            self._count(route, 503, "overloaded")
            raise APIError(503, f"server is at capacity ({self.active_seqs} of {self.capacity} sequences in "
                           "flight); retry later", None, type="overloaded_error", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.active += 1
        self.active_seqs += seqs
        self._gauges()

    def _release(self, seqs: int) -> None:
        self.active -= 1
        self.active_seqs -= seqs
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.in_flight.labels(self.name).set(self.active)
        self.metrics.seqs_in_flight.labels(self.name).set(self.active_seqs)

    def _count(self, route: str, status: int, err_type: str | None = None) -> None:
        self.metrics.requests.labels(self.name, route, str(status)).inc()
        if err_type:
            self.metrics.errors.labels(self.name, route, err_type).inc()

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
        listed = await self.state.openai_serving_models.show_available_models()
        return listed.model_dump()

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    # ---- the request path ------------------------------------------------------------------------

    def _check(self, request: Request, raw: bytes, route: str):
        """Parse and guard one request: (vLLM request, sequences, timeout, what to close if cut)."""
        from llmray.serving.openai_layer import parse_request

        data, req = parse_request(raw, route)
        if data.get("model") is not None and data["model"] not in self.models:
            raise APIError(404, f"model '{data['model']}' does not exist; this server serves "
                           f"{sorted(self.models)}", "model", code="model_not_found")
        seqs = guards.check_request(data, route, self.cfg.limits)
        if route == "chat" and req.max_tokens is None and req.max_completion_tokens is None:
            req.max_completion_tokens = self.cfg.limits.default_max_tokens  # capped by the context left
        close = guards.closing_for(data, route)
        if close is not None and close.drop_token_ids:
            req.return_token_ids = True  # vLLM drops a cut "required" answer; its tokens still say it
        return req, seqs, guards.timeout_s(request.headers, self.cfg.limits.request_timeout_s), close

    async def _serve(self, request: Request, route: str) -> Response:
        try:
            self._auth(request)
            raw = await guards.read_body(request, self.cfg.limits.max_body_bytes)
            req, seqs, timeout_s, close = self._check(request, raw, route)
        except APIError as e:
            self._count(route, e.status, e.type)
            raise
        self._admit(route, seqs)  # raises 503 when full
        deadline = time.monotonic() + timeout_s
        handed_off = False
        try:
            result = await self._call(request, route, req, timeout_s)
            if not hasattr(result, "__aiter__"):
                return self._json(route, result, close)
            # Streaming: wait for the first event before sending headers, so that a timeout or an
            # engine error still gets a real status code.
            try:
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    first = await anext(result, None)
            except TimeoutError:
                await result.aclose()
                raise self._timeout(route, timeout_s) from None
            from llmray.serving.jsonclose import StreamCloser
            from llmray.serving.respond import sse_body

            def on_end(status: int, err: str | None) -> None:
                self._count(route, status, err)
                self._release(seqs)

            handed_off = True
            body = sse_body(self, route, result, first, deadline, StreamCloser(close) if close else None, on_end)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finally:
            if not handed_off:
                self._release(seqs)

    async def _call(self, request: Request, route: str, req, timeout_s: float):
        """vLLM's handler for `route`: a response object, an ErrorResponse (raised as APIError here),
        or an async generator of SSE events."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        from llmray.serving.openai_layer import error_from_vllm
        from llmray.serving.respond import with_disconnect

        if route == "chat":
            work = self.state.openai_serving_chat.create_chat_completion(req, request)
        else:
            work = self.state.openai_serving_completion.create_completion(req, request)
        try:
            async with asyncio.timeout(timeout_s):
                result = await with_disconnect(request, work)
        except TimeoutError:
            raise self._timeout(route, timeout_s) from None
        except ConnectionAbortedError:
            self._count(route, 499, "client_disconnected")
            raise APIError(499, "client disconnected", None) from None
        except Exception as e:  # noqa: BLE001 - vLLM raises its validation errors
            result = create_error_response(e)
        if isinstance(result, ErrorResponse):
            err = error_from_vllm(result, route)
            self._count(route, err.status, err.type)
            raise err
        return result

    def _json(self, route: str, result, close) -> JSONResponse:
        body = result.model_dump()
        if close is not None:
            from llmray.serving.jsonclose import close_choices

            tok = self.engine.renderer.tokenizer
            close_choices(body, close, lambda ids: tok.decode(ids, skip_special_tokens=True))
        self._count(route, 200)
        return JSONResponse(body)

    def _timeout(self, route: str, timeout_s: float) -> APIError:
        self._count(route, 504, "timeout")
        return APIError(504, f"request did not finish within {timeout_s:g}s and was aborted", None,
                        type="timeout_error", code="request_timeout")


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
                           "runtime_env": {"env_vars": {**engine_env(cfg.engine), **cfg.replica_env()}}},
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
    # Fail closed: a non-loopback bind needs a key; the key resolved here travels to every replica
    # inside the deployment's init config (replicas never read their own environment for it).
    key = require_key_for_bind(cfg)
    return LLMServer.options(**deployment_options(cfg)).bind({**to_dict(cfg), "api_key": key})


def _serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (`http_options.host` of a Serve YAML), if Serve is running."""
    try:
        client = serve.context._get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:  # noqa: BLE001 - no Serve yet: the app's own `host` applies
        return None


def app_builder(args: dict[str, Any]):
    """`import_path: llmray.serving.app:app_builder` in a Serve YAML; `args` is a ServeConfig mapping.
    The key check applies to the address Serve really binds (the YAML's http_options.host)."""
    from llmray.config import replace

    cfg = build(ServeConfig, args)
    host = _serve_http_host()
    if host and "host" not in args:
        cfg = replace(cfg, host=host)
    return build_app(cfg)
