"""Stage `tokenizer`: train a byte-level BPE tokenizer with the ChatML template on the corpus.

Local:   llmray tokenizer --config jobs/configs/tokenizer/tiny.yaml
Cluster: ray job submit --working-dir . -- python jobs/tokenizer.py --config jobs/configs/tokenizer/default.yaml
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from llmray import artifacts
from llmray.config import check, to_dict
from llmray.errors import UserError
from llmray.models.tokenizer import SPECIAL_TOKENS, iter_texts, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerConfig:
    corpus: str = "artifacts/corpus"
    """Corpus artifact (or a directory of JSONL/Parquet shards) to train on."""
    text_column: str = "text"
    output: str = "artifacts/tokenizer"
    vocab_size: int = 2048
    """Including the special tokens and the 256 byte symbols."""
    min_frequency: int = 2
    max_documents: int = 20000
    """Documents sampled from the corpus for training (BPE merges converge long before a full pass)."""
    force: bool = False
    """Retrain even when a complete tokenizer artifact exists."""

    def __post_init__(self) -> None:
        floor = 256 + len(SPECIAL_TOKENS)
        check(self.vocab_size > floor, "vocab_size",
              f"must exceed the {len(SPECIAL_TOKENS)} special tokens plus 256 byte symbols ({floor}), "
              f"got {self.vocab_size}")
        check(self.max_documents >= 1, "max_documents", "must be >= 1")



Config = TokenizerConfig


def run(cfg: TokenizerConfig) -> dict:
    """Stage `tokenizer`: train on the corpus artifact, publish a tokenizer artifact."""
    if artifacts.is_complete(cfg.output, "tokenizer") and not cfg.force:
        log.info("tokenizer %s is complete; skipping (force=true to retrain)", cfg.output)
        return {"skipped": True, "output": cfg.output}
    if not Path(cfg.corpus).exists():
        raise UserError(f"corpus not found: {cfg.corpus}")
    texts = list(iter_texts(cfg.corpus, cfg.text_column, cfg.max_documents))
    if not texts:
        raise UserError(f"corpus {cfg.corpus} holds no text in column {cfg.text_column!r}")
    tok = train_tokenizer(texts, cfg.vocab_size, cfg.min_frequency)
    sample = texts[: min(len(texts), 500)]
    n_chars = sum(len(t) for t in sample)
    n_tokens = sum(len(ids) for ids in tok(sample)["input_ids"])
    metrics = {"vocab_size": len(tok), "documents": len(texts), "chars_per_token": round(n_chars / max(n_tokens, 1), 3)}
    inputs = [cfg.corpus] if artifacts.is_complete(cfg.corpus) else []
    with artifacts.publish(cfg.output) as tmp:
        save_tokenizer(tok, tmp)
        artifacts.write_manifest(tmp, "tokenizer", "llmray.stages.tokenizer", to_dict(cfg), metrics, inputs)
    log.info("tokenizer: %s", metrics)
    return {"output": cfg.output, **metrics}
