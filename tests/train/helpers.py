"""Test data for the trainers: packed shards in the `pack` stage's format, written from synthetic documents."""

from __future__ import annotations

import random
from pathlib import Path


def write_packed(out: Path, tokenizer_dir: Path, seq_len: int = 64, n_rows: int = 256, n_shards: int = 2,
                 seed: int = 0) -> Path:
    """shards/part-*.parquet with `input_ids: list<int32>` of exactly seq_len tokens (documents joined by
    EOS), plus a `dataset` manifest naming the tokenizer — the shared packed-dataset contract."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmray import artifacts
    from llmray.data import synthetic
    from llmray.models.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rng = random.Random(seed)
    buf: list[int] = []
    rows: list[list[int]] = []
    while len(rows) < n_rows:
        buf.extend(tok(synthetic.document(rng))["input_ids"] + [tok.eos_token_id])
        while len(buf) >= seq_len and len(rows) < n_rows:
            rows.append(buf[:seq_len])
            buf = buf[seq_len:]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    per = (n_rows + n_shards - 1) // n_shards
    for i in range(n_shards):
        part = rows[i * per:(i + 1) * per]
        table = pa.table({"input_ids": pa.array(part, type=pa.list_(pa.int32()))})
        pq.write_table(table, out / "shards" / f"part-{i:05d}.parquet")
    artifacts.write_manifest(out, "dataset", "tests.train.helpers",
                             {"tokenizer": str(tokenizer_dir), "seq_len": seq_len},
                             {"seq_len": seq_len, "num_sequences": n_rows, "num_tokens": n_rows * seq_len,
                              "vocab_size": len(tok)})
    return out


def read_rows(dataset: Path) -> list[list[int]]:
    import pyarrow.parquet as pq

    rows = []
    for f in sorted(dataset.glob("shards/part-*.parquet")):
        rows.extend(pq.read_table(f).column("input_ids").to_pylist())
    return rows
