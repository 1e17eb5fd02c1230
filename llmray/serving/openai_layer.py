"""vLLM's own OpenAI layer inside the replica: its serving classes (chat, completions, models, tool-call
parsers, structured outputs) built the way `vllm serve` builds them, and strict request parsing into
vLLM's request models (an argument neither OpenAI nor vLLM knows is a 400 naming it)."""

from __future__ import annotations

import json
from typing import Any

from llmray.serving.errors import APIError


def frontend_argv(model: str, name: str, cfg) -> list[str]:
    """`vllm serve` flags of the OpenAI layer for a ServeConfig: the tool-call parser that fits our
    ChatML template (hermes `<tool_call>` JSON), forced tool calls pinned to the argument schemas,
    the adapters, then `openai.extra_args` unchanged."""
    o = cfg.openai
    argv = ["--model", str(model), "--served-model-name", name, "--tool-strict-level", o.tool_strict_level]
    if o.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", o.tool_call_parser]
    if cfg.lora.adapters:
        argv += ["--lora-modules", *[json.dumps({"name": k, "path": v}) for k, v in cfg.lora.adapters.items()]]
    return argv + list(o.extra_args)


def parse_frontend_args(argv: list[str]):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


async def build_state(engine, argv: list[str]):
    """vLLM's app state (what `vllm serve` attaches to its FastAPI app) around our running engine."""
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    state = State()
    await init_app_state(engine, state, parse_frontend_args(argv), await engine.get_supported_tasks())
    return state


def request_class(route: str):
    if route == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest


def _known_fields(cls) -> set[str]:
    names = set()
    for name, f in cls.model_fields.items():
        names.add(name)
        if f.alias:
            names.add(f.alias)
    return names


def parse_request(raw: bytes, route: str):
    """JSON bytes -> vLLM's request model, strictly typed ("5" is not an integer, as with OpenAI); an
    unknown argument or a bad field -> APIError(400) naming it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", None) from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", None)
    cls = request_class(route)
    unknown = sorted(set(data) - _known_fields(cls))
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0],
                       code="unknown_argument")
    return data, validate(cls, data)


def validate(cls, data: dict[str, Any]):
    from pydantic import ValidationError
    from vllm.exceptions import VLLMValidationError

    try:
        return cls.model_validate_json(json.dumps(data), strict=True)
    except VLLMValidationError as e:  # vLLM's own cross-field checks
        raise APIError(400, str(e), getattr(e, "parameter", None)) from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        top = loc[0] if loc else None
        msg = "field required" if err["type"] == "missing" else err["msg"]
        raise APIError(400, f"{'.'.join(loc) or 'request'}: {msg}", top) from None


def error_from_vllm(resp, route: str) -> APIError:
    """vLLM's ErrorResponse -> our APIError (the prompt's field named as the client sent it)."""
    e = resp.error
    param = e.param
    if param in ("input_tokens", "input_text", "prompt_token_ids") or (
            param is None and ("context length" in e.message or "out of vocabulary" in e.message)):
        param = "messages" if route == "chat" else "prompt"
    kind = e.type if e.code < 500 else "server_error"
    if kind in ("BadRequestError", "NotFoundError"):
        kind = "invalid_request_error"
    message = e.message if param is None or e.message.startswith(param) else f"{param}: {e.message}"
    return APIError(e.code, message, param, type=kind)
