"""Generate the synthetic corpus (documents with labelled defects, and task splits).

Local:   llmray corpus --config jobs/configs/corpus/tiny.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
             python jobs/corpus.py --config jobs/configs/corpus/default.yaml output=/mnt/shared/artifacts/corpus
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("corpus")
