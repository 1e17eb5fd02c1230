"""A step transforms a batch of documents and counts what it did; it does no I/O.

A batch is a dict of equal-length column lists (`id`, `text`, any extra columns). A `Mapper`
rewrites the text column; a `Filter` drops documents, naming a reason for each. Counters are
`{step}/in`, `{step}/changed`, `{step}/dropped/{reason}` plus step-specific ones.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

Batch = dict[str, list]


def batch_len(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def select(batch: Batch, keep: list[bool]) -> Batch:
    return {k: [v for v, ok in zip(col, keep) if ok] for k, col in batch.items()}


class Step:
    """Base of all steps: `__call__(batch) -> (batch, counts)`."""

    name = "step"
    text_column = "text"

    def __call__(self, batch: Batch) -> tuple[Batch, Counter]:
        raise NotImplementedError


class Mapper(Step):
    """Rewrites each text; `map(text) -> (new_text, extra_counts)`."""

    def map(self, text: str) -> tuple[str, dict[str, int]]:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> tuple[Batch, Counter]:
        counts: Counter = Counter()
        texts = batch[self.text_column]
        counts[f"{self.name}/in"] += len(texts)
        out = []
        for t in texts:
            new, extra = self.map(t)
            if new != t:
                counts[f"{self.name}/changed"] += 1
            for k, v in extra.items():
                counts[f"{self.name}/{k}"] += v
            out.append(new)
        return {**batch, self.text_column: out}, counts


class Filter(Step):
    """Drops documents; `reject(text) -> reason or None` (None keeps the document). A filter
    that also edits what it keeps (e.g. drops lines) overrides `apply` instead."""

    def reject(self, text: str) -> str | None:
        raise NotImplementedError

    def apply(self, text: str) -> tuple[str, str | None, dict[str, int]]:
        """(possibly edited text, drop reason or None, extra counts)."""
        return text, self.reject(text), {}

    def __call__(self, batch: Batch) -> tuple[Batch, Counter]:
        counts: Counter = Counter()
        texts = batch[self.text_column]
        counts[f"{self.name}/in"] += len(texts)
        keep, out = [], []
        for t in texts:
            new, reason, extra = self.apply(t)
            keep.append(reason is None)
            out.append(new)
            if reason is not None:
                counts[f"{self.name}/dropped/{reason}"] += 1
            elif new != t:
                counts[f"{self.name}/changed"] += 1
            for k, v in extra.items():
                counts[f"{self.name}/{k}"] += v
        return select({**batch, self.text_column: out}, keep), counts


def run_steps(steps: Iterable[Step], batch: Batch) -> tuple[Batch, Counter]:
    """Apply steps in order, summing their counts; stops early when nothing is left."""
    total: Counter = Counter()
    for step in steps:
        if batch_len(batch) == 0:
            break
        batch, counts = step(batch)
        total.update(counts)
    return batch, total
