"""Closing a JSON-mode answer that ran out of tokens: the shortest text that makes a valid JSON prefix
(what a grammar-constrained engine produced) a complete JSON value. llmray appends it when a
`json_object` answer ends with finish_reason "length", so clients always get parseable JSON."""

from __future__ import annotations

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


def close_choices(body: dict, texts: dict[int, str] | None = None) -> dict:
    """Close every choice of a (non-streamed) chat or completion response cut by max_tokens."""
    for ch in body.get("choices", []):
        if ch.get("finish_reason") != "length":
            continue
        msg = ch.get("message")
        if msg is not None and isinstance(msg.get("content"), str):
            msg["content"] += closing(msg["content"])
        elif isinstance(ch.get("text"), str):
            ch["text"] += closing(ch["text"])
    return body


class StreamCloser:
    """The same for a stream: follows each choice's text and adds the closing to the delta that
    carries finish_reason "length"."""

    def __init__(self):
        self.texts: dict[int, str] = {}

    def event(self, ev: str) -> str:
        import json

        if not ev.startswith("data: {"):
            return ev
        body = json.loads(ev[6:])
        changed = False
        for ch in body.get("choices", []):
            delta = ch.get("delta")
            key, holder = ("content", delta) if delta is not None else ("text", ch)
            piece = holder.get(key) or ""
            text = self.texts.get(ch.get("index", 0), "") + piece
            if ch.get("finish_reason") == "length":
                holder[key] = piece + closing(text)
                changed = True
            self.texts[ch.get("index", 0)] = text
        return f"data: {json.dumps(body)}\n\n" if changed else ev
