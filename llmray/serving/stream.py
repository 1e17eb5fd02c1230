"""Streaming a response in HTTP chunks: engine outputs are queued as they come (`pump`) and written in
batches of at most one per flush window (`batches`), the response's end never held back."""

from __future__ import annotations

import asyncio
import time


async def pump(stream, first_item, queue: asyncio.Queue) -> None:
    """Engine outputs of one request -> `queue`, then None (or the exception that stopped it).
    (None, not a sentinel object: Serve may ship the deployment class by value, copying globals.)"""
    try:
        item = first_item
        while item is not None:
            queue.put_nowait(item)
            item = await anext(stream, None)
        queue.put_nowait(None)
    except Exception as e:  # noqa: BLE001 - handed to the SSE writer, which reports it in-band
        queue.put_nowait(e)


def is_last(item) -> bool:
    return item is None or isinstance(item, BaseException)


async def batches(queue: asyncio.Queue, flush_s: float):
    """What `pump` queued, in batches: the first item at once, then at most one batch per `flush_s`
    (what arrives meanwhile joins it). A batch that reaches the end (None or an exception) leaves at
    once: nothing follows it, so holding it would only delay the response's end."""
    last_sent = None
    while True:
        items = [await queue.get()]
        while last_sent is not None and not is_last(items[-1]):
            wait = last_sent + flush_s - time.monotonic()
            if wait <= 0:
                break
            try:
                async with asyncio.timeout(wait):
                    items.append(await queue.get())
            except TimeoutError:
                break
        while not is_last(items[-1]) and not queue.empty():
            items.append(queue.get_nowait())
        last_sent = time.monotonic()
        yield items
        if is_last(items[-1]):
            return
