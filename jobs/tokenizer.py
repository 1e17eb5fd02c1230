"""Train a byte-level BPE tokenizer with the ChatML template on a corpus artifact.

Local:   llmray tokenizer --config jobs/configs/tokenizer/tiny.yaml
Cluster: ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
             python jobs/tokenizer.py --config jobs/configs/tokenizer/default.yaml \
             corpus=/mnt/shared/artifacts/corpus output=/mnt/shared/artifacts/tokenizer
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("tokenizer")
