"""Byte-level BPE tokenizer training (the `tokenizers` library) with a ChatML chat template.

Special tokens: `<|pad|>`, `<|im_start|>`, `<|im_end|>`. `<|im_end|>` is the EOS token: it ends
every chat turn (so generation stops after the assistant's answer) and separates documents when
pretraining data is packed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from llmray.config import check

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)

# ChatML. The assistant turn ends with EOS; `add_generation_prompt` opens an assistant turn.
# `{% generation %}` marks what the model is trained to produce (return_assistant_tokens_mask).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
              f"must exceed the {len(SPECIAL_TOKENS)} special tokens plus 256 byte symbols ({floor}), got {self.vocab_size}")
        check(self.max_documents >= 1, "max_documents", "must be >= 1")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "PreTrainedTokenizerFast":
    """Train byte-level BPE on `texts` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size {vocab_size} must exceed the special tokens plus 256 bytes ({floor})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", out_dir: str | Path) -> Path:
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerFast":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def iter_texts(path: str | Path, column: str = "text", limit: int | None = None) -> Iterator[str]:
    """Texts from a directory of JSONL / Parquet shards (recursively), in file order."""
    import pyarrow.parquet as pq

    root = Path(path)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.suffix in (".jsonl", ".parquet") and not p.name.startswith(".")
    )
    n = 0
    for f in files:
        if f.suffix == ".parquet":
            batches = (b.column(column).to_pylist() for b in pq.ParquetFile(f).iter_batches(columns=[column]))
            rows = (t for batch in batches for t in batch)
        else:
            rows = (json.loads(line).get(column) for line in f.open() if line.strip())
        for text in rows:
            if isinstance(text, str) and text:
                yield text
                n += 1
                if limit is not None and n >= limit:
                    return


def run(cfg: TokenizerConfig) -> dict:
    """Stage `tokenizer`: train on the corpus artifact, publish a tokenizer artifact."""
    from llmray import artifacts
    from llmray.config import to_dict
    from llmray.errors import UserError

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
        artifacts.write_manifest(tmp, "tokenizer", "llmray.models.tokenizer", to_dict(cfg), metrics, inputs)
    log.info("tokenizer: %s", metrics)
    return {"output": cfg.output, **metrics}
