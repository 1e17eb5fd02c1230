"""Clean, filter and deduplicate documents (exact + MinHash LSH) with Ray Data.

Local:   llmray clean-dedup --config jobs/configs/clean_dedup/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/clean_dedup.py --config jobs/configs/clean_dedup/default.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("clean-dedup")
