"""Data-stage fixtures: one small labelled corpus and one reference clean-dedup run per session."""

from __future__ import annotations

from pathlib import Path

import pytest


def clean_cfg(input_dir, output, **kw):
    from llmray.config import build
    from llmray.data.config import CleanDedupConfig

    data = {"input": str(input_dir), "output": str(output), "read": {"chunk_rows": 500},
            "dedup": {"num_partitions": 3}}
    for k, v in kw.items():
        node = data
        *path, last = k.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = v
    return build(CleanDedupConfig, data)


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory) -> Path:
    """1,600 labelled documents in 8 JSONL shards (exact and near duplicates, junk, PII)."""
    from llmray.data import synthetic
    from llmray.stages import corpus as corpus_stage

    out = tmp_path_factory.mktemp("data_stage") / "corpus"
    corpus_stage.run(synthetic.CorpusConfig(output=str(out), num_documents=1600, docs_per_shard=200, num_sft=1,
                                         num_preference=1, num_prompts=1, num_eval=1))
    return out


@pytest.fixture(scope="session")
def clean_reference(ray_cluster, data_corpus) -> tuple[Path, dict]:
    """clean-dedup of `data_corpus` with 3 shuffle partitions and unbounded task concurrency."""
    from llmray.stages.clean_dedup import run

    out = data_corpus.parent / "clean_p3"
    result = run(clean_cfg(data_corpus / "docs", out))
    return out, result
