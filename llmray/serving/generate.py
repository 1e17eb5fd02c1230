"""OpenAI requests -> vLLM engine calls -> OpenAI responses: validation against the model, sampling
parameters, merged per-prompt streams, usage counts, logprobs, and SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from llmray.serving.config import LimitsConfig
from llmray.serving.schemas import APIError, ChatCompletionRequest, CompletionRequest


@dataclass
class Plan:
    """A validated request: token ids per prompt, the vLLM sampling params, and bookkeeping."""
    prompts: list[list[int]]
    params: Any
    n: int
    chat: bool
    echo_texts: list[str] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _sampling_params(req, max_tokens: int, logprobs: int | None, n: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k if req.top_k > 0 else -1, min_p=req.min_p, seed=req.seed,
        stop=req.stops() or None, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        logprobs=logprobs, ignore_eos=req.ignore_eos, min_tokens=min(req.min_tokens, max_tokens),
        output_kind=RequestOutputKind.DELTA,
    )


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int, limits: LimitsConfig,
                field_name: str) -> int:
    room = max_model_len - prompt_len
    if requested is None:
        return max(1, min(limits.default_max_tokens, room))
    if requested <= 0:
        raise APIError(400, f"{field_name} must be >= 1, got {requested}", field_name)
    if requested > room:
        raise APIError(400, f"{field_name}={requested} plus the prompt's {prompt_len} tokens exceeds the "
                       f"model's context of {max_model_len} tokens", field_name, code="context_length_exceeded")
    return requested


def _check_common(req, limits: LimitsConfig, logprobs: int | None, logprobs_field: str) -> None:
    if req.n > limits.max_n:
        raise APIError(400, f"n must be <= {limits.max_n}, got {req.n}", "n")
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise APIError(400, f"{logprobs_field} must be <= {limits.max_logprobs}, got {logprobs}", logprobs_field)
    if req.n > 1 and req.temperature == 0:
        raise APIError(400, "n > 1 needs temperature > 0 (greedy choices would be identical)", "n")


def _check_prompt(ids: list[int], vocab: int, max_model_len: int, field_name: str) -> None:
    if not ids:
        raise APIError(400, f"{field_name} is empty", field_name)
    if any(t < 0 or t >= vocab for t in ids):
        raise APIError(400, f"{field_name} has token ids outside the vocabulary [0, {vocab})", field_name)
    if len(ids) >= max_model_len:
        raise APIError(400, f"{field_name} has {len(ids)} tokens; the model's context is {max_model_len} "
                       "tokens (and at least one must be left to generate)", field_name, code="context_length_exceeded")


def plan_completion(req: CompletionRequest, tok, vocab: int, max_model_len: int, limits: LimitsConfig) -> Plan:
    _check_common(req, limits, req.logprobs, "logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    raw = req.prompts()
    if len(raw) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(raw)}", "prompt")
    prompts = [tok(p)["input_ids"] if isinstance(p, str) else list(p) for p in raw]
    for ids in prompts:
        _check_prompt(ids, vocab, max_model_len, "prompt")
    if req.echo and req.stream:
        raise APIError(400, "echo is not supported with stream", "echo")
    longest = max(len(p) for p in prompts)
    max_tokens = _max_tokens(req.max_tokens, longest, max_model_len, limits, "max_tokens")
    params = _sampling_params(req, max_tokens, req.logprobs, req.n)
    if req.echo and req.logprobs is not None:
        params.prompt_logprobs = req.logprobs
    echo = [p if isinstance(p, str) else tok.decode(p) for p in raw] if req.echo else None
    return Plan(prompts, params, req.n, chat=False, echo_texts=echo)


def plan_chat(req: ChatCompletionRequest, tok, vocab: int, max_model_len: int, limits: LimitsConfig) -> Plan:
    top = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    _check_common(req, limits, top, "top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=req.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault
        raise APIError(400, f"messages cannot be rendered with the model's chat template: {e}", "messages") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    _check_prompt(ids, vocab, max_model_len, "messages")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(req.max_new_tokens(), len(ids), max_model_len, limits, name)
    return Plan([ids], _sampling_params(req, max_tokens, top, req.n), req.n, chat=True)


async def run_plan(engine, plan: Plan) -> AsyncIterator[tuple[int, Any]]:
    """Yield (prompt index, RequestOutput delta) from one engine request per prompt, as they come.
    Cancelling the consumer cancels every engine request (vLLM aborts them: slots are freed)."""
    from vllm.inputs import TokensPrompt

    if len(plan.prompts) == 1:
        async for out in engine.generate(TokensPrompt(prompt_token_ids=plan.prompts[0]), plan.params,
                                         f"{plan.request_id}-0"):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, ids: list[int]) -> None:
        try:
            async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), plan.params, f"{plan.request_id}-{i}"):
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(plan.prompts)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)


def _logprob_entries(tok, logprobs, token_ids) -> list[tuple[str, float, dict[str, float]]]:
    out = []
    for tid, lp in zip(token_ids, logprobs or []):
        chosen = lp.get(tid)
        top = {(v.decoded_token if v.decoded_token is not None else tok.decode([k])): v.logprob for k, v in lp.items()}
        text = chosen.decoded_token if chosen is not None and chosen.decoded_token is not None else tok.decode([tid])
        out.append((text, chosen.logprob if chosen is not None else float("nan"), top))
    return out


class Accumulator:
    """Folds RequestOutput deltas into per-choice text, token counts, logprobs and finish reasons."""

    def __init__(self, plan: Plan, tok):
        self.plan, self.tok = plan, tok
        self.choices = [Choice() for _ in range(len(plan.prompts) * plan.n)]
        self.prompt_tokens = sum(len(p) for p in plan.prompts)
        self.prompt_logprobs: dict[int, list] = {}

    def add(self, i: int, out) -> list[tuple[int, str, int, list, str | None]]:
        """Fold a delta in; return (choice index, new text, new tokens, new logprob entries, finish reason)."""
        deltas = []
        if getattr(out, "prompt_logprobs", None) and i not in self.prompt_logprobs:
            self.prompt_logprobs[i] = out.prompt_logprobs
        for c in out.outputs:
            k = i * self.plan.n + c.index
            ch = self.choices[k]
            ch.text += c.text
            ch.tokens += len(c.token_ids)
            lps = _logprob_entries(self.tok, c.logprobs, c.token_ids) if c.logprobs is not None else []
            ch.logprobs.extend(lps)
            if c.finish_reason is not None:
                ch.finish_reason = "stop" if c.finish_reason == "abort" else c.finish_reason
            deltas.append((k, c.text, len(c.token_ids), lps, c.finish_reason))
        return deltas

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def completion_logprobs(entries, offset: int = 0) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for text, lp, top in entries:
        tokens.append(text)
        lps.append(lp)
        tops.append(top)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                         "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode())}
                                          for k, v in top.items()]}
                        for t, lp, top in entries]}


def final_response(acc: Accumulator, plan: Plan, model: str, want_logprobs: bool) -> dict[str, Any]:
    choices = []
    for k, ch in enumerate(acc.choices):
        if plan.chat:
            choices.append({"index": k, "message": {"role": "assistant", "content": ch.text},
                            "logprobs": chat_logprobs(ch.logprobs) if want_logprobs else None,
                            "finish_reason": ch.finish_reason})
            continue
        text, lp = ch.text, None
        if plan.echo_texts is not None:
            prompt_text = plan.echo_texts[k // plan.n]
            text = prompt_text + ch.text
            if want_logprobs:
                ids = plan.prompts[k // plan.n]
                pl = acc.prompt_logprobs.get(k // plan.n) or []
                entries = [(acc.tok.decode([ids[0]]), None, None)] + _logprob_entries(acc.tok, pl[1:], ids[1:])
                lp = completion_logprobs(entries + ch.logprobs)
        elif want_logprobs:
            lp = completion_logprobs(ch.logprobs)
        choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": ch.finish_reason})
    return {"id": ("chatcmpl-" if plan.chat else "cmpl-") + plan.request_id,
            "object": "chat.completion" if plan.chat else "text_completion",
            "created": plan.created, "model": model, "choices": choices, "usage": acc.usage()}


def sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def stream_chunks(plan: Plan, model: str, deltas, want_logprobs: bool) -> list[dict[str, Any]]:
    """SSE payloads for one batch of deltas (empty deltas without a finish reason are skipped)."""
    base = {"id": ("chatcmpl-" if plan.chat else "cmpl-") + plan.request_id,
            "object": "chat.completion.chunk" if plan.chat else "text_completion",
            "created": plan.created, "model": model}
    chunks = []
    for k, text, _ntok, lps, finish in deltas:
        if not text and finish is None and not lps:
            continue
        finish = None if finish is None else ("stop" if finish == "abort" else finish)
        if plan.chat:
            choice = {"index": k, "delta": {"content": text} if text else {},
                      "logprobs": chat_logprobs(lps) if want_logprobs else None, "finish_reason": finish}
        else:
            choice = {"index": k, "text": text, "logprobs": completion_logprobs(lps) if want_logprobs else None,
                      "finish_reason": finish}
        chunks.append({**base, "choices": [choice]})
    return chunks
