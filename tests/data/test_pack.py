"""Packing: pure row cutting and position ids; the `pack` stage writes the packed-dataset contract."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmray import artifacts
from llmray.data.pack import PackConfig, pack_tokens, position_ids
from llmray.errors import UserError

EOS = 2


def test_pack_tokens_cuts_rows_and_keeps_remainder():
    rows, rest = pack_tokens(np.arange(10), 4)
    assert rows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and rest.tolist() == [8, 9]


def test_position_ids_restart_after_eos_and_at_row_start():
    rows = np.array([[5, 6, EOS, 7, 8, EOS], [9, EOS, EOS, 3, 4, 5]])
    assert position_ids(rows, EOS).tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 0, 1, 2]]


def test_pack_stage_writes_contract(clean_reference, tokenizer_dir, tmp_path):
    from llmray.stages.pack import run
    from llmray.models.tokenizer import load_tokenizer

    clean, _ = clean_reference
    out = tmp_path / "packed"
    res = run(PackConfig(input=str(clean), tokenizer=str(tokenizer_dir), output=str(out), seq_len=128,
                         reset_position_ids=True))
    m = artifacts.require(out, "dataset")
    assert m.config["tokenizer"] == str(tokenizer_dir)
    shards = sorted((out / "shards").glob("part-*.parquet"))
    assert [f"shards/{s.name}" for s in shards] == m.metrics["shards"]
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("position_ids").type == pa.list_(pa.int32())
    ids = np.array(table.column("input_ids").to_pylist())
    assert ids.shape == (m.metrics["num_sequences"], 128) == (res["num_sequences"], 128)
    assert m.metrics["num_tokens"] == ids.size and m.metrics["vocab_size"] == 1024
    # The first row is the first documents of the first clean file, joined by EOS.
    tok = load_tokenizer(tokenizer_dir)
    texts = pq.read_table(sorted((clean / "docs").glob("*.parquet"))[0]).column("text").to_pylist()[:5]
    expect = [t for doc in tok(texts, add_special_tokens=False)["input_ids"] for t in (*doc, tok.eos_token_id)]
    assert ids[0].tolist() == expect[:128]
    pos = np.array(table.column("position_ids").to_pylist())
    assert (pos == position_ids(ids, tok.eos_token_id)).all()
    # Every token is accounted for: packed + dropped tails = tokens of all documents + one EOS each.
    assert m.metrics["documents"] == pq.read_table(clean / "docs").num_rows


def test_pack_errors_name_the_problem(clean_reference, tokenizer_dir, tmp_path):
    from llmray.stages.pack import run

    clean, _ = clean_reference
    with pytest.raises(UserError, match="tokenizer not found"):
        run(PackConfig(input=str(clean), tokenizer=str(tmp_path / "none"), output=str(tmp_path / "o")))
    with pytest.raises(UserError, match="no full sequence"):
        run(PackConfig(input=str(clean), tokenizer=str(tokenizer_dir), output=str(tmp_path / "o"), seq_len=10**7))
    assert not (tmp_path / "o").exists()
