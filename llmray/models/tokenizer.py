"""Byte-level BPE tokenizer training (the `tokenizers` library) with a ChatML chat template.

Special tokens: `<|pad|>`, `<|im_start|>`, `<|im_end|>`. `<|im_end|>` is the EOS token: it ends
every chat turn (so generation stops after the assistant's answer) and separates documents when
pretraining data is packed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator


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
    "{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
