"""Tokenize clean documents and pack them into fixed-length Parquet shards for pretraining.

Local:   llmray pack --config jobs/configs/pack/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/pack.py --config jobs/configs/pack/default.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("pack")
