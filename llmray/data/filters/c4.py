"""C4 rules (Raffel et al. 2020): line-level clean-up plus document drops, with C4's defaults."""

from __future__ import annotations

import re

from llmray.data.filters.base import Filter

TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "…", "。", "！", "？")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.I)
_SENTENCE_END = re.compile(r"[.!?。！？]+(?=\s|$)")


class C4Filter(Filter):
    """Keeps lines ending in terminal punctuation with >= `min_words_per_line` words and no
    'javascript' or policy phrases; drops documents with lorem ipsum, a curly brace, a word
    longer than `max_word_length`, or fewer than `min_num_sentences` sentences left."""

    name = "c4"

    def __init__(self, min_words_per_line: int = 3, min_num_sentences: int = 5, max_word_length: int = 1000,
                 filter_lorem_ipsum: bool = True, filter_curly_bracket: bool = True,
                 filter_javascript: bool = True, filter_policy: bool = True, remove_citations: bool = True):
        self.min_words_per_line, self.min_num_sentences, self.max_word_length = (
            min_words_per_line, min_num_sentences, max_word_length)
        self.lorem, self.curly, self.js, self.policy, self.citations = (
            filter_lorem_ipsum, filter_curly_bracket, filter_javascript, filter_policy, remove_citations)

    def apply(self, text: str) -> tuple[str, str | None, dict[str, int]]:
        low = text.lower()
        if self.lorem and "lorem ipsum" in low:
            return text, "lorem_ipsum", {}
        if self.curly and "{" in text:
            return text, "curly_bracket", {}
        kept, removed = [], 0
        for para in text.split("\n\n"):
            lines = []
            for line in para.split("\n"):
                s = line.strip()
                if self.citations:
                    s = _CITATION.sub("", s)
                ls = s.lower()
                words = s.split()
                if (not s.endswith(TERMINAL_PUNCT) or len(words) < self.min_words_per_line
                        or (self.js and "javascript" in ls) or (self.policy and any(p in ls for p in POLICY))):
                    removed += bool(line.strip())
                    continue
                if any(len(w) > self.max_word_length for w in words):
                    return text, "long_word", {}
                lines.append(s)
            if lines:
                kept.append("\n".join(lines))
        out = "\n\n".join(kept)
        extra = {"lines_removed": removed} if removed else {}
        if len(_SENTENCE_END.findall(out)) < self.min_num_sentences:
            return out, "too_few_sentences", extra
        return out, None, extra
