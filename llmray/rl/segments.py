"""Partial rollouts: a batch generated in segments of at most `rollout.segment_tokens` tokens, so that a
weight push can land between two segments and an unfinished sequence goes on with the new weights.

    parts = None
    for seg in itertools.count():
        requests = segment_requests(prompt_ids, sampling, segment_tokens, seg, parts)
        if not requests:
            break
        outs = [generate(r.prompt_ids, r.sampling) for r in requests]      # with weight version v
        parts = advance(prompt_ids, sampling, parts, requests, outs, v)
    records = finished_records(parts, tokenizer)                          # as the rollout worker's

Segment 0 samples `n` responses per prompt; every later segment continues each unfinished sample from
prompt + its tokens so far (as prompt token ids, one sample, the remaining `max_tokens`). A sample is
finished when the engine stopped it (EOS or a stop token: finish_reason "stop") or it has
`max_tokens` tokens. Each token records the version of the segment that generated it, and its
log-prob is the one the engine returned (the behaviour policy's). Pure functions: no Ray, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmray.rl.workers.rollout import prompt_seed

SEGMENT_SEED_BASE = 1 << 40
"""Segment s > 0 samples from `segment_seed(seed, s)`, never from the step's own seed: vLLM would replay
the first segment's random stream on the continued tokens (the same draws at every segment)."""


@dataclass
class Part:
    """One (prompt, sample) under generation."""

    prompt_index: int
    sample_index: int
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reason: str = ""
    segments: int = 0


@dataclass(frozen=True)
class Request:
    """One engine call of a segment: which parts it continues (None: segment 0, all prompts), their
    prompt token ids and the sampling settings."""

    parts: tuple[int, ...] | None
    prompt_ids: list[list[int]]
    sampling: dict


def segment_seed(seed: int | None, segment: int) -> int | None:
    """The sampling seed of segment `segment` of a generation whose seed is `seed`."""
    if seed is None or segment == 0:
        return seed
    return prompt_seed(seed, SEGMENT_SEED_BASE + segment)


def is_done(part: Part, max_tokens: int) -> bool:
    return part.finish_reason == "stop" or len(part.response_ids) >= max_tokens


def segment_requests(prompt_ids: list[list[int]], sampling: dict, segment_tokens: int, segment: int,
                     parts: list[Part] | None) -> list[Request]:
    """The engine calls of segment `segment` (none when every sample is finished). Samples that have
    generated the same number of tokens share a call (in practice all unfinished ones do)."""
    if segment_tokens < 1:
        raise ValueError(f"rollout.segment_tokens must be >= 1, got {segment_tokens}")
    max_tokens = int(sampling["max_tokens"])
    if parts is None:
        return [Request(None, [list(p) for p in prompt_ids],
                        {**sampling, "max_tokens": min(segment_tokens, max_tokens)})]
    by_length: dict[int, list[int]] = {}
    for k, part in enumerate(parts):
        if not is_done(part, max_tokens):
            by_length.setdefault(len(part.response_ids), []).append(k)
    requests = []
    for length, ks in sorted(by_length.items()):
        s = {**sampling, "n": 1, "max_tokens": min(segment_tokens, max_tokens - length),
             "seed": segment_seed(sampling.get("seed"), segment)}
        if "min_tokens" in sampling:
            s["min_tokens"] = max(0, int(sampling["min_tokens"] or 0) - length)
        requests.append(Request(tuple(ks), [list(prompt_ids[parts[k].prompt_index]) + parts[k].response_ids
                                            for k in ks], s))
    return requests


def advance(prompt_ids: list[list[int]], sampling: dict, parts: list[Part] | None, requests: list[Request],
            outs: list[list[dict]], version: int) -> list[Part]:
    """The parts after one segment: `outs[i]` is the engine's answer to `requests[i]` (rollout records,
    prompt-major, `prompt_index` numbering that call's prompts), generated with weight `version`."""
    if parts is None:
        (out,) = outs
        parts = [Part(int(o["prompt_index"]), int(o["sample_index"])) for o in out]
        pairs = list(zip(range(len(parts)), out))
    else:
        pairs = []
        for req, out in zip(requests, outs):
            if len(out) != len(req.parts):
                raise ValueError(f"segment: {len(req.parts)} continuations asked, {len(out)} returned")
            pairs += [(req.parts[int(o["prompt_index"])], o) for o in out]
    for k, o in pairs:
        part, ids = parts[k], [int(t) for t in o["response_ids"]]
        part.response_ids += ids
        part.logprobs += [float(x) for x in o["logprobs"]]
        part.versions += [int(version)] * len(ids)
        part.texts.append(o.get("text", ""))
        part.finish_reason = o.get("finish_reason") or "length"
        part.segments += 1
    return parts


def finished_records(prompt_ids: list[list[int]], parts: list[Part], tokenizer=None) -> list[dict]:
    """Rollout records as the rollout worker returns them, plus `token_versions` per response token.
    `text` is the whole response decoded by `tokenizer` (the segments' texts joined without one)."""
    out = []
    for p in parts:
        if p.segments > 1 and tokenizer is not None:
            text = tokenizer.decode(p.response_ids, skip_special_tokens=True)
        else:
            text = "".join(p.texts)
        out.append({"prompt_index": p.prompt_index, "sample_index": p.sample_index,
                    "prompt_ids": list(prompt_ids[p.prompt_index]), "response_ids": list(p.response_ids),
                    "logprobs": list(p.logprobs), "cumulative_logprob": sum(p.logprobs), "text": text,
                    "finish_reason": p.finish_reason, "token_versions": list(p.versions)})
    return out


def spans_versions(versions: list[int]) -> bool:
    """True when a response's tokens come from more than one weight version (a partial rollout)."""
    return len(set(versions)) > 1
