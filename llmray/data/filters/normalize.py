"""Unicode NFKC + whitespace clean-up, and HTML tag / entity stripping."""

from __future__ import annotations

import html
import re
import unicodedata

from llmray.data.filters.base import Mapper

_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_SCRIPT = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_BLOCK = re.compile(r"</?(p|div|br|li|ul|ol|h[1-6]|tr|table|section|article|header|footer)\b[^>]*>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9-]*(\s[^<>]*)?/?>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)


class Normalize(Mapper):
    """NFKC; CRLF -> LF; control characters removed; runs of spaces collapsed; each line
    stripped; at most one blank line between paragraphs."""

    name = "normalize"

    def map(self, text: str) -> tuple[str, dict[str, int]]:
        t = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
        t = _CONTROL.sub("", t)
        t = "\n".join(_SPACES.sub(" ", line).strip() for line in t.split("\n"))
        t = _MANY_NEWLINES.sub("\n\n", t).strip()
        return t, {}


class HtmlStrip(Mapper):
    """Removes scripts/styles/comments and tags (block tags become line breaks), unescapes
    entities. Counts documents that held markup as `html_docs`."""

    name = "html"

    def map(self, text: str) -> tuple[str, dict[str, int]]:
        if "<" not in text and "&" not in text:
            return text, {}
        t = _COMMENT.sub("", _SCRIPT.sub("", text))
        t = _BLOCK.sub("\n", t)
        t, n_tags = _TAG.subn("", t)
        t = html.unescape(t)
        if t != text:
            t = _MANY_NEWLINES.sub("\n\n", "\n".join(_SPACES.sub(" ", x).strip() for x in t.split("\n"))).strip()
        return t, ({"html_docs": 1, "tags": n_tags} if n_tags else {})
