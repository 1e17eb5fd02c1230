"""Deterministic synthetic corpus with ground truth: documents with labelled defects, and tasks.

Document i is generated from its own seed (seed, i), so any document can be regenerated alone and
the corpus streams to disk shard by shard: 1k or 10M documents cost the same memory. Injected
defects (exact and near duplicates, boilerplate, repeated lines, symbol soup, too-short docs, PII)
are labelled in `labels/`, beside `docs/`, so cleaning and dedup precision/recall can be measured.
The task splits (`sft/`, `preference/`, `prompts/`, `eval/`) come from `llmray.data.tasks`.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from llmray.config import check
from llmray.data import tasks

log = logging.getLogger(__name__)

# --- vocabulary: real function words + a large pseudo-word lexicon built from syllables ---------
STOP = ("the", "of", "and", "to", "that", "with", "have", "be")
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "tr", "ch", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y")
_CODAS = ("", "n", "r", "s", "t", "l", "m", "nd", "st", "rk")


def _lexicon(size: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        n = rng.choice((1, 2, 2, 3))
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n)))
    return sorted(words)


NOUNS = _lexicon(6000, 1)
VERBS = [w + "s" for w in _lexicon(2500, 2)]
ADJS = [w + "ic" for w in _lexicon(2500, 3)]
PREPS = ("in", "over", "under", "near", "beyond", "across", "through", "beside", "within", "after")

_SENTENCES = (
    "The {a} {n} {v} the {n2} {p} the {a2} {n3}.",
    "A {n} {v} with the {n2} and the {n3}.",
    "In the {a} {n}, the {n2} {v} that the {n3} was {a2}.",
    "It is {a} to be {p} the {n} of the {n2}.",
    "Many {n}s have {a} {n2}s, and the {n3} {v} them.",
    "When the {n} {v}, the {a} {n2} and the {n3} follow.",
    "Some say that the {n} of {n2} {v} {p} every {a} {n3}.",
)

BOILERPLATE = (
    "Home | About | Contact | Privacy Policy\n"
    "This website uses cookies to improve your experience\n"
    "By using this site you agree to our terms of use\n"
    "Subscribe to our newsletter\n"
    "javascript must be enabled to view this page\n"
    "Copyright 2026 All rights reserved\n"
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit\n"
    "Click here to read more"
)
_SYMBOLS = "#{}[]<>|\\/@$%^&*~`=+_"

DEFECTS = ("exact_dup", "near_dup", "boilerplate", "repeated_lines", "symbol_soup", "too_short", "pii")
DROPPED_BY_CLEANING = ("boilerplate", "repeated_lines", "symbol_soup", "too_short")
DROPPED_BY_DEDUP = ("exact_dup", "near_dup")


def sentence(rng: random.Random) -> str:
    t = rng.choice(_SENTENCES)
    return t.format(
        a=rng.choice(ADJS), a2=rng.choice(ADJS), n=rng.choice(NOUNS), n2=rng.choice(NOUNS),
        n3=rng.choice(NOUNS), v=rng.choice(VERBS), p=rng.choice(PREPS),
    ).capitalize()


def document(rng: random.Random, min_paragraphs: int = 2, max_paragraphs: int = 4) -> str:
    """A clean document: 2–4 paragraphs of 3–7 sentences (about 80–350 words)."""
    paragraphs = []
    for _ in range(rng.randint(min_paragraphs, max_paragraphs)):
        paragraphs.append(" ".join(sentence(rng) for _ in range(rng.randint(3, 7))))
    return "\n\n".join(paragraphs)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def near_duplicate(text: str, target: float, rng: random.Random, n: int = 5) -> tuple[str, float]:
    """Replace words of `text` one at a time until the n-gram Jaccard similarity to the original
    drops to `target` or just below; returns the new text and its exact similarity."""
    paragraphs = [p.split(" ") for p in text.split("\n\n")]
    slots = [(i, j) for i, p in enumerate(paragraphs) for j in range(len(p))]
    rng.shuffle(slots)
    sim = 1.0
    out = text
    # Changing one word alters up to n shingles of S: J ~ (S - m) / (S + m); start near the target.
    total = max(1, len(text.split()) - n + 1)
    m = total * (1 - target) / (1 + target)
    start = max(0, int(0.5 * m / n))  # half the estimate: never overshoot the target range
    for k, (i, j) in enumerate(slots):
        paragraphs[i][j] = rng.choice(NOUNS)
        if k < start:
            continue
        out = "\n\n".join(" ".join(p) for p in paragraphs)
        sim = jaccard(text, out, n)
        if sim <= target:
            break
    return out, sim


def _pii(rng: random.Random) -> tuple[str, dict]:
    name = rng.choice(NOUNS)
    email = f"{name}.{rng.randint(1, 999)}@example.com"
    phone = f"+1 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    ip = f"192.0.2.{rng.randint(1, 254)}"
    text = f"Write to {email} or call {phone} for the {rng.choice(NOUNS)}; the server is at {ip}."
    return text, {"emails": 1, "phones": 1, "ips": 1}


@dataclass(frozen=True)
class CorpusConfig:
    output: str = "artifacts/corpus"
    num_documents: int = 2000
    docs_per_shard: int = 1000
    format: Literal["jsonl", "parquet"] = "jsonl"
    seed: int = 0
    exact_dup_rate: float = 0.05
    """Fraction of documents that are exact copies (up to whitespace) of an earlier clean document."""
    near_dup_rate: float = 0.05
    """Fraction that are near copies of an earlier clean document at a similarity in near_dup_jaccard."""
    near_dup_jaccard: tuple[float, float] = (0.8, 0.95)
    """Range of 5-gram Jaccard similarity of a near duplicate to its original."""
    junk_rate: float = 0.08
    """Fraction of junk documents (boilerplate, repeated lines, symbol soup, too short), in equal parts."""
    pii_rate: float = 0.05
    """Fraction of clean documents carrying an email, a phone number and an IP address."""
    num_sft: int = 3000
    num_preference: int = 1500
    num_prompts: int = 1000
    num_eval: int = 200
    max_operand: int = 20
    force: bool = False

    def __post_init__(self) -> None:
        check(self.num_documents >= 1, "num_documents", "must be >= 1")
        check(self.docs_per_shard >= 1, "docs_per_shard", "must be >= 1")
        for key in ("exact_dup_rate", "near_dup_rate", "junk_rate", "pii_rate"):
            check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        check(self.exact_dup_rate + self.near_dup_rate + self.junk_rate < 0.9, "junk_rate",
              "exact_dup_rate + near_dup_rate + junk_rate must stay below 0.9")
        lo, hi = self.near_dup_jaccard
        check(0.0 < lo <= hi < 1.0, "near_dup_jaccard",
              f"must satisfy 0 < low <= high < 1, got {self.near_dup_jaccard}")
        check(self.max_operand >= 1, "max_operand", "must be >= 1")


def _doc_rng(seed: int, i: int) -> random.Random:
    return random.Random(seed * 1_000_003 + i)


def clean_document(cfg: CorpusConfig, i: int) -> str:
    """The clean text document i would have (its own seed): originals of duplicates regenerate it."""
    return document(_doc_rng(cfg.seed, i))


def generate_documents(cfg: CorpusConfig) -> Iterator[tuple[dict, dict]]:
    """(document, label) pairs, in id order. Duplicates point at an earlier clean document."""
    lo, hi = cfg.near_dup_jaccard
    junk = ("boilerplate", "repeated_lines", "symbol_soup", "too_short")
    for i in range(cfg.num_documents):
        rng = _doc_rng(cfg.seed + 7919, i)  # the defect draw, independent of the text draw
        doc_id = f"doc-{i:08d}"
        u = rng.random()
        label = {"id": doc_id, "cluster": doc_id, "defect": None, "drop": None}
        text = None
        if i >= 10 and u < cfg.exact_dup_rate + cfg.near_dup_rate:
            src = rng.randrange(i)
            src_u = _doc_rng(cfg.seed + 7919, src).random()
            if src_u >= cfg.exact_dup_rate + cfg.near_dup_rate + cfg.junk_rate + cfg.pii_rate:
                original = clean_document(cfg, src)
                label["cluster"] = f"doc-{src:08d}"
                if u < cfg.exact_dup_rate:
                    text = original.replace(" ", "  ", 1) if rng.random() < 0.5 else original
                    label.update(defect="exact_dup", drop="dedup")
                else:
                    text, sim = near_duplicate(original, rng.uniform(lo, hi), rng)
                    label.update(defect="near_dup", drop="dedup", jaccard=round(sim, 4))
        elif cfg.junk_rate > 0 and u < cfg.exact_dup_rate + cfg.near_dup_rate + cfg.junk_rate:
            kind = junk[int((u - cfg.exact_dup_rate - cfg.near_dup_rate) / cfg.junk_rate * len(junk)) % len(junk)]
            base = clean_document(cfg, i)
            if kind == "boilerplate":
                text = BOILERPLATE
            elif kind == "repeated_lines":
                line = sentence(rng)
                text = "\n".join([line] * rng.randint(12, 30))
            elif kind == "symbol_soup":
                text = " ".join("".join(rng.choice(_SYMBOLS) for _ in range(rng.randint(3, 9))) for _ in range(80))
            else:
                text = " ".join(base.split()[: rng.randint(3, 12)])
            label.update(defect=kind, drop="clean")
        elif u < cfg.exact_dup_rate + cfg.near_dup_rate + cfg.junk_rate + cfg.pii_rate:
            base = clean_document(cfg, i)
            pii, counts = _pii(rng)
            paragraphs = base.split("\n\n")
            paragraphs.insert(rng.randint(0, len(paragraphs)), pii)
            text = "\n\n".join(paragraphs)
            label.update(defect="pii", pii=counts)
        if text is None:
            text = clean_document(cfg, i)
        yield {"id": doc_id, "text": text, "source": "synthetic"}, label


def generate_task_splits(cfg: CorpusConfig) -> dict[str, Iterator[dict]]:
    """The task splits: SFT chats, preference pairs, RL prompts and held-out eval prompts."""

    def split(name: str, n: int, make):
        rng = random.Random(f"{cfg.seed}-{name}")
        for _ in range(n):
            yield make(tasks.make_task(rng, max_operand=cfg.max_operand), rng)

    return {
        "sft": split("sft", cfg.num_sft, lambda t, r: tasks.sft_record(t)),
        "preference": split("preference", cfg.num_preference, tasks.preference_record),
        "prompts": split("prompts", cfg.num_prompts, lambda t, r: tasks.prompt_record(t)),
        "eval": split("eval", cfg.num_eval, lambda t, r: tasks.prompt_record(t)),
    }


class ShardWriter:
    """Writes rows into numbered JSONL or Parquet shards of at most `rows_per_shard` rows."""

    def __init__(self, directory: Path, fmt: str, rows_per_shard: int):
        self.dir, self.fmt, self.rows_per_shard = directory, fmt, rows_per_shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self.buffer: list[dict] = []
        self.shards: list[str] = []
        self.rows = 0

    def write(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"part-{len(self.shards):05d}.{self.fmt}"
        path = self.dir / name
        if self.fmt == "jsonl":
            with path.open("w") as f:
                for row in self.buffer:
                    f.write(json.dumps(row) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(self.buffer), path)
        self.shards.append(name)
        self.rows += len(self.buffer)
        self.buffer = []


def write_corpus(cfg: CorpusConfig, out: Path) -> dict:
    """Write docs/, labels/ and the task splits under `out`; return counts."""
    from collections import Counter

    from tqdm import tqdm

    docs = ShardWriter(out / "docs", cfg.format, cfg.docs_per_shard)
    labels = ShardWriter(out / "labels", "jsonl", cfg.docs_per_shard)
    defects: Counter = Counter()
    for doc, label in tqdm(generate_documents(cfg), total=cfg.num_documents, desc="corpus", unit="doc",
                           mininterval=2.0, disable=cfg.num_documents < 5000):
        docs.write(doc)
        labels.write(label)
        defects[label["defect"] or "clean"] += 1
    docs.flush()
    labels.flush()
    counts = {"documents": docs.rows, "doc_shards": len(docs.shards), "defects": dict(defects)}
    for name, rows in generate_task_splits(cfg).items():
        w = ShardWriter(out / name, "jsonl", 100_000)
        for row in rows:
            w.write(row)
        w.flush()
        counts[name] = w.rows
    return counts


def read_labels(corpus_dir: str | Path) -> dict[str, dict]:
    """id -> label, for measuring cleaning and dedup against the ground truth."""
    out = {}
    for f in sorted((Path(corpus_dir) / "labels").glob("*.jsonl")):
        for line in f.open():
            label = json.loads(line)
            out[label["id"]] = label
    return out
