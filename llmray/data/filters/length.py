"""Minimum / maximum document length in characters (the cheapest filter: runs first)."""

from __future__ import annotations

from llmray.data.filters.base import Filter


class LengthFilter(Filter):
    name = "length"

    def __init__(self, min_chars: int = 15, max_chars: int = 1_000_000):
        self.min_chars, self.max_chars = min_chars, max_chars

    def reject(self, text: str) -> str | None:
        n = len(text)
        if n < self.min_chars:
            return "too_short"
        if n > self.max_chars:
            return "too_long"
        return None
