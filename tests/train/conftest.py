"""Fixtures for the trainer tests: a packed dataset (the `pack` contract) written from synthetic documents."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def packed_dataset(tmp_path_factory, tokenizer_dir) -> Path:
    from helpers import write_packed

    return write_packed(tmp_path_factory.mktemp("packed"), tokenizer_dir, seq_len=64, n_rows=256, n_shards=2)
