"""Typed configs of the data stages: reading, cleaning (with the published thresholds), dedup."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmray.cluster import RayConfig
from llmray.config import check


@dataclass(frozen=True)
class ReadConfig:
    text_column: str = "text"
    id_column: str = "id"
    """Column holding a document id; rows without one get `<file name>:<line>`."""
    keep_columns: list[str] = field(default_factory=lambda: ["source"])
    """Extra input columns carried to the output (as strings) when present."""
    chunk_rows: int = 5000
    """Rows a task processes at once: bounds its memory, amortises per-batch overhead."""
    max_errors: int = 100
    """Error budget: bad lines, rows and files skipped before the job fails writing nothing."""

    def __post_init__(self) -> None:
        check(self.chunk_rows >= 1, "read.chunk_rows", "must be >= 1")
        check(self.max_errors >= 0, "read.max_errors", "must be >= 0")


@dataclass(frozen=True)
class GopherQualityConfig:
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    """('#' + ellipses) per word."""
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    """Fraction of words that must hold an alphabetic character."""
    min_stop_words: int = 2
    """Of: the, be, to, of, and, that, have, with."""


@dataclass(frozen=True)
class GopherRepetitionConfig:
    enabled: bool = True
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: list[tuple[int, float]] = field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    """(n, max fraction of word characters in the most frequent n-gram)."""
    dup_n_grams: list[tuple[int, float]] = field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
    """(n, max fraction of word characters inside repeated n-grams)."""


@dataclass(frozen=True)
class C4Config:
    enabled: bool = True
    min_words_per_line: int = 3
    min_num_sentences: int = 5
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_curly_bracket: bool = True
    filter_javascript: bool = True
    filter_policy: bool = True
    remove_citations: bool = True


@dataclass(frozen=True)
class FineWebConfig:
    enabled: bool = True
    line_punct_thr: float = 0.12
    """Minimum fraction of lines ending in terminal punctuation."""
    short_line_thr: float = 0.67
    """Maximum fraction of lines of at most `short_line_length` characters."""
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    """Maximum fraction of characters in repeated lines."""
    new_line_ratio: float = 0.3
    """Maximum newlines per word."""


@dataclass(frozen=True)
class CleanConfig:
    enabled: bool = True
    """false: only read and deduplicate (the dedup benchmark compares dedup alone)."""
    normalize: bool = True
    """Unicode NFKC and whitespace clean-up."""
    html: bool = True
    pii: bool = True
    """Redact e-mails, phone numbers and IPs (counted per kind)."""
    min_chars: int = 15
    max_chars: int = 1_000_000
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)

    def __post_init__(self) -> None:
        check(0 <= self.min_chars <= self.max_chars, "clean.min_chars", "must satisfy 0 <= min_chars <= max_chars")


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    """Drop documents whose case- and whitespace-normalised text hashes equal."""
    minhash: bool = True
    """Drop near duplicates found by MinHash LSH."""
    shingle: str = "word"
    """`word`: n-grams of words; `char`: n-grams of characters; both on lower-cased text with
    whitespace collapsed. Defaults measured on real text: docs/data.md, "Dedup parameters"."""
    ngram: int = 2
    """Shingle size in words or characters."""
    num_perm: int = 128
    bands: int | None = 42
    rows: int | None = 3
    """bands x rows <= num_perm. With both null they are derived from `threshold`."""
    threshold: float = 0.4
    """Jaccard a candidate pair must reach (estimated from the two full signatures) to count as
    duplicates when `verify`; also derives bands/rows (datasketch's optimiser) when they are null."""
    verify: bool = True
    """Check every LSH candidate pair against `threshold` before it joins a cluster."""
    all_pairs_max: int = 64
    """With `verify`: buckets of up to this many ids give every pair as candidates (a rejected
    star centre then loses no true pair); larger buckets give a star from the smallest id."""
    seed: int = 1
    num_partitions: int = 4
    """Hash partitions of the key shuffle and of the component labels (any value gives the same output)."""

    def __post_init__(self) -> None:
        check(self.shingle in ("word", "char"), "dedup.shingle", f"must be 'word' or 'char', got {self.shingle!r}")
        check(self.ngram >= 1, "dedup.ngram", "must be >= 1")
        check(self.num_perm >= 2, "dedup.num_perm", "must be >= 2")
        check(0.0 < self.threshold < 1.0, "dedup.threshold", "must be in (0, 1)")
        check(self.all_pairs_max >= 0, "dedup.all_pairs_max", "must be >= 0")
        check(self.num_partitions >= 1, "dedup.num_partitions", "must be >= 1")
        check((self.bands is None) == (self.rows is None), "dedup.bands", "set both bands and rows, or neither")
        if self.bands is not None and self.rows is not None:
            check(self.bands >= 1 and self.rows >= 1, "dedup.bands", "bands and rows must be >= 1")
            check(self.bands * self.rows <= self.num_perm, "dedup.bands",
                  f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")

    def band_shape(self) -> tuple[int, int]:
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        from llmray.data.dedup.minhash import optimal_bands

        return optimal_bands(self.threshold, self.num_perm)


@dataclass(frozen=True)
class CleanDedupConfig:
    input: str = "artifacts/corpus/docs"
    """JSONL/Parquet file, directory, glob or URI (s3://, gs://, file://)."""
    output: str = "artifacts/clean"
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    num_cpus_per_task: float = 1.0
    """CPUs each read/clean/sign task asks Ray for."""
    max_tasks_in_flight: int | None = None
    """Cap on concurrent file tasks (null: as many as the CPUs allow)."""
    force: bool = False
    """Rebuild even when a complete output exists."""
    keep_work: bool = False
    """Keep the resumable work directory (`.<output>.work`) after publishing."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "must name a file, directory, glob or URI")
        check(self.num_cpus_per_task > 0, "num_cpus_per_task", "must be > 0")
        check(self.max_tasks_in_flight is None or self.max_tasks_in_flight >= 1, "max_tasks_in_flight", "must be >= 1")
