"""llmray's guards in front of vLLM's OpenAI layer: body cap (413), OpenAI's value ranges, the `n` /
logprobs / prompt caps, the sequences a request asks for (admission counts them), the model name and
the per-request timeout header. They check; they do not re-implement the protocol."""

from __future__ import annotations

from typing import Any

from llmray.serving.errors import APIError

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
MAX_STOP = 4


async def read_body(request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes."""
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


def _range(data: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> None:
    v = data.get(key)
    if v is None:
        return
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise APIError(400, f"{key} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", key)


def n_prompts(data: dict[str, Any]) -> int:
    p = data.get("prompt")
    if isinstance(p, list) and p and not all(isinstance(x, int) for x in p):
        return len(p)
    return 1


def check_request(data: dict[str, Any], route: str, limits) -> int:
    """OpenAI's ranges and llmray's caps on an already type-checked request; returns the number of
    sequences it asks the engine for (prompts x max(n, best_of))."""
    for key in ("max_tokens", "max_completion_tokens"):
        if data.get(key) is not None and data[key] < 1:
            raise APIError(400, f"{key} must be >= 1, got {data[key]}", key)
    _range(data, "temperature", 0, 2)
    _range(data, "top_p", 0, 1, lo_open=True)
    _range(data, "presence_penalty", -2, 2)
    _range(data, "frequency_penalty", -2, 2)
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop sequences, got {len(stops)}", "stop")
    n = data.get("n") or 1
    if n > limits.max_n:
        raise APIError(400, f"n must be <= {limits.max_n}, got {n}", "n")
    if route == "chat":
        _check_messages(data)
        lp_key, lp = "top_logprobs", data.get("top_logprobs")
    else:
        if n_prompts(data) > limits.max_prompts:
            raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {n_prompts(data)}", "prompt")
        if data.get("prompt") in ("", []):
            raise APIError(400, "prompt must not be empty", "prompt")
        lp_key, lp = "logprobs", data.get("logprobs")
    if lp is not None and lp > limits.max_logprobs:
        raise APIError(400, f"{lp_key} must be <= {limits.max_logprobs}, got {lp}", lp_key)
    return n_prompts(data) * max(n, data.get("best_of") or 1)


def _check_messages(data: dict[str, Any]) -> None:
    msgs = data.get("messages") or []
    if not msgs:
        raise APIError(400, "messages must hold at least one message", "messages")
    for i, m in enumerate(msgs):
        if m.get("role") not in ROLES:
            raise APIError(400, f"messages.{i}.role: must be one of {sorted(ROLES)}, got {m.get('role')!r}",
                           "messages")


def timeout_s(headers, limit: float) -> float:
    """limits.request_timeout_s, or a shorter `X-Request-Timeout: <seconds>` from the client."""
    raw = headers.get("x-request-timeout")
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


def closing_for(data: dict[str, Any], route: str):
    """What llmray closes in this request's answer if max_tokens cuts it (`jsonclose.Closing`), or
    None: a `json_object` answer, or a chat answer forced to call a tool ("required", or a named
    function; their arguments follow the functions' schemas, so a cut one is a JSON prefix)."""
    from llmray.serving.jsonclose import Closing

    rf = data.get("response_format") or {}
    so = data.get("structured_outputs") or {}
    if rf.get("type") == "json_object" or bool(so.get("json_object")):
        return Closing("json")
    choice = data.get("tool_choice")
    if route != "chat" or not data.get("tools") or choice in (None, "auto", "none"):
        return None
    declared = frozenset((t.get("function") or {}).get("name") for t in data["tools"] if isinstance(t, dict))
    if choice == "required":
        return Closing("required", declared,
                       drop_token_ids=not data.get("return_token_ids") and not data.get("stream"))
    return Closing("named", declared)
