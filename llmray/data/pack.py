"""Tokenize documents and pack them into fixed-length training sequences (`pack_file`, one input file
per Ray task; the recipe is `llmray.stages.pack`).

Documents are tokenized (no special tokens added), each followed by EOS, concatenated, and cut
into rows of exactly `seq_len` tokens; the tail of each input file that does not fill a row is
dropped and counted. With `reset_position_ids`, a `position_ids` column restarts at 0 at the start
of every row and after every EOS, so attention/positions can be reset at document boundaries.
One Ray Data task per input file writes `shards/part-i.parquet`; shard i packs input file i in
order, so the output does not depend on parallelism. Shards + manifest follow the packed-dataset
contract read by pretraining (`input_ids: list<int32>`, labels = inputs).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmray.cluster import RayConfig
from llmray.config import check
from llmray.data.mix import MixConfig
from llmray.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackConfig:
    input: str = "artifacts/clean"
    """A clean-dedup dataset artifact (its `docs/` is read), or any JSONL/Parquet path, glob or URI."""
    tokenizer: str = "artifacts/tokenizer"
    output: str = "artifacts/packed"
    text_column: str = "text"
    seq_len: int = 512
    reset_position_ids: bool = False
    """Write `position_ids` that restart after every EOS (document boundary)."""
    tokenize_batch: int = 1000
    """Documents per tokenizer call."""
    max_errors: int = 100
    """Bad input records tolerated before the stage fails writing nothing."""
    num_cpus_per_task: float = 1.0
    force: bool = False
    mix: MixConfig | None = None
    """Several sources with weights and token budgets per phase (`llmray.data.mix`); replaces `input`."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.tokenize_batch >= 1, "tokenize_batch", "must be >= 1")
        check(self.max_errors >= 0, "max_errors", "must be >= 0")
        check(self.num_cpus_per_task > 0, "num_cpus_per_task", "must be > 0")


def pack_tokens(buffer: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, seq_len), remainder) from a flat token buffer."""
    n = len(buffer) // seq_len
    return buffer[: n * seq_len].reshape(n, seq_len), buffer[n * seq_len :]


def position_ids(rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Per row: 0, 1, 2, ... restarting at the token after each EOS (and at the row start)."""
    n, s = rows.shape
    idx = np.broadcast_to(np.arange(s), (n, s))
    # Index of the first token of the current document: last EOS position + 1, carried forward.
    starts = np.where(np.concatenate([np.zeros((n, 1), bool), rows[:, :-1] == eos_id], axis=1), idx, 0)
    starts = np.maximum.accumulate(starts, axis=1)
    return (idx - starts).astype(np.int32)


def _list_column(rows: np.ndarray):
    import pyarrow as pa

    n, s = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * s, s, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1).astype(np.int32), pa.int32()))


def _fast_tokenizer(path: str, eos_token: str):
    """The `tokenizers` object behind a transformers fast tokenizer dir: imports in a fraction of
    the time `transformers` takes, which matters in every fresh Ray worker."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    eos = tok.token_to_id(eos_token)
    if eos is None:
        raise UserError(f"tokenizer {path}: EOS token {eos_token!r} is not in its vocabulary")
    return tok, eos


def pack_file(idx: int, uri: str, cfg: PackConfig, out_dir: str, eos_token: str) -> dict:
    """Tokenize and pack one input file into `out_dir/part-idx.parquet`; return its counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray.data.readers import ReadErrors, read_chunks

    t0 = time.perf_counter()
    tok, eos = _fast_tokenizer(cfg.tokenizer, eos_token)
    errors = ReadErrors()
    buf = np.zeros(0, dtype=np.int64)
    rows_out: list[np.ndarray] = []
    docs = tokens = 0
    for batch in read_chunks(uri, cfg.text_column, "id", (), cfg.tokenize_batch, errors):
        ids = [e.ids for e in tok.encode_batch(batch["text"], add_special_tokens=False)]
        docs += len(ids)
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
        tokens += len(flat)
        rows, buf = pack_tokens(np.concatenate([buf, flat]), cfg.seq_len)
        if len(rows):
            rows_out.append(rows)
    rows = np.concatenate(rows_out) if rows_out else np.zeros((0, cfg.seq_len), dtype=np.int64)
    cols = {"input_ids": _list_column(rows)}
    if cfg.reset_position_ids:
        cols["position_ids"] = _list_column(position_ids(rows, eos))
    out = Path(out_dir) / f"part-{idx:05d}.parquet"
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, out)
    return {"idx": idx, "documents": docs, "tokens_in": tokens, "sequences": len(rows),
            "dropped_tokens": len(buf), "errors": json.dumps(errors.items), "seconds": time.perf_counter() - t0}
