"""What the replica sends back from vLLM's OpenAI layer: JSON bodies, and SSE streams written in
batches of at most one HTTP chunk per `stream_flush_ms`, with the request timeout enforced in-band,
JSON-mode answers closed, and the admission slot released when the stream ends or the client leaves."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from llmray.serving.errors import APIError
from llmray.serving.stream import batches, pump

log = logging.getLogger(__name__)


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def with_disconnect(request, coro):
    """Run `coro`; cancel it (vLLM then aborts the engine request) if the client disconnects first."""
    from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(listen_for_disconnect(request))
    try:
        done, _ = await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ConnectionAbortedError("client disconnected")


async def sse_body(server, route: str, stream, first, deadline: float, closer, on_end):
    """The response body of one streamed request (an async iterator of bytes).
    `on_end(status, err_type)` runs exactly once, however the stream ends."""
    queue: asyncio.Queue = asyncio.Queue()
    pump_task = asyncio.create_task(pump(stream, first, queue))
    chunks = batches(queue, server.cfg.stream_flush_ms / 1000.0)
    status, err = 499, "client_disconnected"
    try:
        while True:
            try:
                async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                    items = await anext(chunks)
            except TimeoutError:
                status, err = 504, "timeout"
                yield (sse(APIError(504, "request timed out while streaming and was aborted", None,
                                    type="timeout_error", code="request_timeout").body()) + sse("[DONE]"))
                return
            done = items[-1] is None
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            events = [it for it in items if isinstance(it, str)]
            if closer is not None:
                events = [closer.event(ev) for ev in events]
            if events:
                yield "".join(events).encode()
            if done:
                status, err = 200, None
                return
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band
        status, err = 500, "server_error"
        log.exception("streaming failed")
        yield sse(APIError(500, f"generation failed: {type(e).__name__}", None, type="server_error").body())
    finally:
        # A client that went away cancels this generator: stopping the pump and closing vLLM's
        # stream aborts the engine request, which frees its slots and KV cache.
        await chunks.aclose()
        pump_task.cancel()
        try:
            await pump_task
        except BaseException:  # noqa: BLE001 - cancelled, or its error was already reported
            pass
        await stream.aclose()
        on_end(status, err)
