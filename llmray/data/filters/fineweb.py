"""FineWeb quality rules (Penedo et al. 2024): line punctuation, short lines, duplicated lines,
newline ratio, with FineWeb's thresholds."""

from __future__ import annotations

from llmray.data.filters.base import Filter
from llmray.data.filters.c4 import TERMINAL_PUNCT
from llmray.data.filters.gopher import _dup_stats


class FineWebFilter(Filter):
    name = "fineweb"

    def __init__(self, line_punct_thr: float = 0.12, short_line_thr: float = 0.67, short_line_length: int = 30,
                 char_duplicates_ratio: float = 0.01, new_line_ratio: float = 0.3):
        self.line_punct_thr, self.short_line_thr, self.short_line_length = (
            line_punct_thr, short_line_thr, short_line_length)
        self.char_duplicates_ratio, self.new_line_ratio = char_duplicates_ratio, new_line_ratio

    def reject(self, text: str) -> str | None:
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if not lines:
            return "empty"
        if sum(ln.endswith(TERMINAL_PUNCT) for ln in lines) / len(lines) < self.line_punct_thr:
            return "line_punct_ratio"
        if sum(len(ln) <= self.short_line_length for ln in lines) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        _, dup_chars = _dup_stats(lines)
        if dup_chars / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, len(text.split())) > self.new_line_ratio:
            return "list_ratio"
        return None
