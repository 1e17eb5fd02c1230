"""Gopher quality and repetition filters (Rae et al. 2021, MassiveText), with the published thresholds."""

from __future__ import annotations

import re
from collections import Counter

from llmray.data.filters.base import Filter

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")
BULLETS = ("•", "●", "○", "■", "□", "▪", "‣", "-", "*")


class GopherQualityFilter(Filter):
    """Word count, mean word length, symbol/word ratio, bullet and ellipsis lines, alphabetic
    words, stop words."""

    name = "gopher_quality"

    def __init__(self, min_doc_words: int = 50, max_doc_words: int = 100_000, min_avg_word_length: float = 3.0,
                 max_avg_word_length: float = 10.0, max_symbol_word_ratio: float = 0.1,
                 max_bullet_lines_ratio: float = 0.9, max_ellipsis_lines_ratio: float = 0.3,
                 min_alpha_words_ratio: float = 0.8, min_stop_words: int = 2):
        self.min_doc_words, self.max_doc_words = min_doc_words, max_doc_words
        self.min_avg, self.max_avg = min_avg_word_length, max_avg_word_length
        self.max_symbol, self.max_bullet, self.max_ellipsis = (
            max_symbol_word_ratio, max_bullet_lines_ratio, max_ellipsis_lines_ratio)
        self.min_alpha, self.min_stop = min_alpha_words_ratio, min_stop_words

    def reject(self, text: str) -> str | None:
        words = text.split()
        n = len(words)
        if n < self.min_doc_words:
            return "too_few_words"
        if n > self.max_doc_words:
            return "too_many_words"
        avg = sum(map(len, words)) / n
        if avg < self.min_avg:
            return "short_mean_word_length"
        if avg > self.max_avg:
            return "long_mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > self.max_symbol:
            return "symbol_word_ratio"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if lines:
            if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > self.max_bullet:
                return "bullet_lines"
            if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis:
                return "ellipsis_lines"
        if len(_ALPHA_WORD.findall(text)) / n < self.min_alpha:
            return "non_alpha_words"
        lower = {w.lower().strip(".,;:!?\"'") for w in words}
        if sum(s in lower for s in STOP_WORDS) < self.min_stop:
            return "few_stop_words"
        return None


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in them)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


class GopherRepetitionFilter(Filter):
    """Duplicate lines/paragraphs (by count and characters), top n-gram character fraction,
    duplicated n-gram character fraction."""

    name = "gopher_repetition"

    def __init__(self, dup_line_frac: float = 0.3, dup_para_frac: float = 0.3, dup_line_char_frac: float = 0.2,
                 dup_para_char_frac: float = 0.2,
                 top_n_grams: tuple = ((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_n_grams: tuple = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))):
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        self.top_n_grams, self.dup_n_grams = tuple(top_n_grams), tuple(dup_n_grams)

    def reject(self, text: str) -> str | None:
        total = max(1, len(text))
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        n, chars = _dup_stats(paras)
        if paras and n / len(paras) > self.dup_para_frac:
            return "dup_para_frac"
        if chars / total > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        n, chars = _dup_stats(lines)
        if lines and n / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if chars / total > self.dup_line_char_frac:
            return "dup_line_char_frac"
        words = text.split()
        wchars = max(1, sum(len(w) for w in words))
        for n_, frac in self.top_n_grams:
            grams = Counter(zip(*(words[j:] for j in range(n_))))
            if grams:
                top, count = grams.most_common(1)[0]
                if count > 1 and sum(map(len, top)) * count / wchars > frac:
                    return f"top_{n_}_gram"
        # Any repeated n-gram with n >= k contains a repeated k-gram: skip the scan when the
        # shortest size has none (the common case).
        if self.dup_n_grams:
            k = min(n_ for n_, _ in self.dup_n_grams)
            grams = list(zip(*(words[j:] for j in range(k))))
            if len(set(grams)) == len(grams):
                return None
        for n_, frac in self.dup_n_grams:
            if _dup_ngram_char_frac(words, n_) / wchars > frac:
                return f"dup_{n_}_gram"
        return None


def _dup_ngram_char_frac(words: list[str], n: int) -> int:
    """Characters of words covered by an n-gram that occurred earlier (each word counted once)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i : i + n])
        if g in seen:
            for j in range(i, i + n):
                covered[j] = True
        else:
            seen.add(g)
    return sum(len(w) for w, c in zip(words, covered) if c)
