"""Stage `corpus`: the synthetic corpus (documents with planted junk and duplicates, chat, preference
and task prompts) with its ground-truth labels, published as a `corpus` artifact.

Local:   llmray corpus --config jobs/configs/corpus/tiny.yaml
Cluster: ray job submit --working-dir . -- python jobs/corpus.py --config jobs/configs/corpus/default.yaml
"""

from __future__ import annotations

import logging

from llmray import artifacts
from llmray.config import to_dict
from llmray.data.synthetic import CorpusConfig, write_corpus

log = logging.getLogger(__name__)

Config = CorpusConfig


def run(cfg: CorpusConfig) -> dict:
    """Stage `corpus`: publish a corpus artifact (skipped when a complete one exists)."""
    if artifacts.is_complete(cfg.output, "corpus") and not cfg.force:
        log.info("corpus %s is complete; skipping (force=true to regenerate)", cfg.output)
        return {"skipped": True, "output": cfg.output}
    with artifacts.publish(cfg.output) as tmp:
        counts = write_corpus(cfg, tmp)
        artifacts.write_manifest(tmp, "corpus", "llmray.stages.corpus", to_dict(cfg), counts)
    log.info("corpus: %s", counts)
    return {"output": cfg.output, **counts}
