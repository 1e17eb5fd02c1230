"""Closing a JSON answer that ran out of tokens: the shortest text that makes a valid JSON prefix (what a
grammar-constrained engine produced) a complete JSON value. llmray appends it when a `json_object`
answer, or a forced tool call (`tool_choice` "required" or a named function), ends with finish_reason
"length", so clients always get parseable JSON; finish_reason stays "length"."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

LITERALS = ("true", "false", "null")


def _scan(text: str) -> tuple[list[str], bool, str, str]:
    """(open containers, inside a string, pending escape, what is expected next) after `text`.
    expected: "value", "key" (after "{" or ","), "colon", "after" (a value just ended), "key_or_end"."""
    stack: list[str] = []
    in_str, esc, expect = False, "", "value"
    for ch in text:
        if in_str:
            if esc == "\\":
                esc = "u" if ch == "u" else ""
                continue
            if esc:  # "u" + the hex digits seen so far
                esc = esc + ch if len(esc) < 4 else ""
                continue
            elif ch == "\\":
                esc = "\\"
            elif ch == '"':
                in_str = False
                expect = "colon" if expect == "key_str" else "after"
            continue
        if ch in " \t\r\n":
            continue
        if ch == '"':
            in_str = True
            expect = "key_str" if expect in ("key", "key_or_end") else "value_str"
        elif ch in "{[":
            stack.append(ch)
            expect = "key_or_end" if ch == "{" else "value_or_end"
        elif ch in "}]":
            stack.pop()
            expect = "after"
        elif ch == ":":
            expect = "value"
        elif ch == ",":
            expect = "key" if stack and stack[-1] == "{" else "value"
        else:
            expect = "scalar"
    return stack, in_str, esc, expect


def closing(text: str) -> str:
    """The suffix that completes `text`, a prefix of some JSON value, into a valid JSON value."""
    stack, in_str, esc, expect = _scan(text)
    out = ""
    if in_str:
        if esc == "\\":
            out += "n"
        elif esc:
            out += "0" * (5 - len(esc))
        out += '"'
        expect = "colon" if expect == "key_str" else "after"
    elif expect == "scalar":
        tail = text.rstrip()
        word = tail[len(tail.rstrip("abcdefghijklmnopqrstuvwxyz")):]
        lit = next((w for w in LITERALS if word and w.startswith(word)), None)
        if lit is not None:
            out += lit[len(word):]
        elif tail and tail[-1] in "-+.eE":
            out += "0"
        expect = "after"
    if expect == "colon":
        out += ":null"
    elif expect == "key":
        out += '"":null'
    elif expect == "value":
        out += "null" if stack or not text.strip() else ""
    for c in reversed(stack):
        out += "}" if c == "{" else "]"
    return out


def completed(text: str) -> str:
    """`text` closed if it is a JSON prefix that closing makes parse; else `text` unchanged."""
    try:
        whole = text + closing(text)
        json.loads(whole)
        return whole
    except (ValueError, IndexError):
        return text


@dataclass(frozen=True)
class Closing:
    """What to close in one request's answer when it is cut by max_tokens. kind: "json" (a
    `json_object` answer), "required" (a JSON array of calls of the `declared` functions) or "named"
    (the named function's arguments). `drop_token_ids`: llmray asked vLLM for the token ids (to read
    a cut `required` answer, which vLLM drops) and removes them from the body."""

    kind: str
    declared: frozenset[str] = field(default_factory=frozenset)
    drop_token_ids: bool = False


def required_calls(text: str, declared: frozenset[str]) -> list[dict]:
    """The tool calls of a `tool_choice: "required"` answer cut short: its array of
    {"name", "parameters"} closed; elements naming a declared function are kept (arguments closed)."""
    try:
        items = json.loads(text + closing(text))
    except (ValueError, IndexError):
        return []
    calls = []
    for it in items if isinstance(items, list) else []:
        if isinstance(it, dict) and it.get("name") in declared:
            params = it.get("parameters")
            calls.append({"id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": it["name"], "arguments": json.dumps(
                              params if isinstance(params, dict) else {}, ensure_ascii=False)}})
    return calls


def close_choices(body: dict, how: Closing, decode=None) -> dict:
    """Close every choice of a (non-streamed) chat or completion response cut by max_tokens;
    `decode(token_ids)`: the choice's text, for a cut `required` answer."""
    for ch in body.get("choices", []):
        ids = ch.pop("token_ids", None) if how.drop_token_ids else ch.get("token_ids")
        if ch.get("finish_reason") != "length":
            continue
        msg = ch.get("message")
        if how.kind == "named":
            for call in (msg or {}).get("tool_calls") or []:
                call["function"]["arguments"] = completed(call["function"]["arguments"])
        elif how.kind == "required":
            if msg is not None and not msg.get("tool_calls") and ids is not None and decode is not None:
                msg["tool_calls"], msg["content"] = required_calls(decode(ids), how.declared), None
        elif msg is not None and isinstance(msg.get("content"), str):
            msg["content"] += closing(msg["content"])
        elif isinstance(ch.get("text"), str):
            ch["text"] += closing(ch["text"])
    if how.drop_token_ids:
        body.pop("prompt_token_ids", None)
    return body


class StreamCloser:
    """The same for a stream: follows each choice's text (or, for a forced tool call, each call's
    arguments) and adds the closing to the delta that carries finish_reason "length"."""

    def __init__(self, how: Closing):
        self.how = how
        self.texts: dict[int, str] = {}
        self.args: dict[int, dict[int, str]] = {}  # choice -> tool call index -> arguments so far

    def event(self, ev: str) -> str:
        if not ev.startswith("data: {"):
            return ev
        body = json.loads(ev[6:])
        changed = False
        for ch in body.get("choices", []):
            i, delta = ch.get("index", 0), ch.get("delta")
            if self.how.kind in ("required", "named"):
                if delta is None:
                    delta = ch["delta"] = {}
                changed |= self._tool_delta(i, delta, ch.get("finish_reason") == "length")
                continue
            key, holder = ("content", delta) if delta is not None else ("text", ch)
            piece = holder.get(key) or ""
            text = self.texts.get(i, "") + piece
            if ch.get("finish_reason") == "length":
                holder[key] = piece + closing(text)
                changed = True
            self.texts[i] = text
        return f"data: {json.dumps(body)}\n\n" if changed else ev

    def _tool_delta(self, i: int, delta: dict, cut: bool) -> bool:
        calls = self.args.setdefault(i, {})
        for tc in delta.get("tool_calls") or []:
            k = tc.get("index", 0)
            calls[k] = calls.get(k, "") + ((tc.get("function") or {}).get("arguments") or "")
        if not cut or not calls:
            return False
        last = max(calls)
        tail = completed(calls[last])[len(calls[last]):]
        if not tail:
            return False
        delta.setdefault("tool_calls", []).append({"index": last, "function": {"arguments": tail}})
        return True
