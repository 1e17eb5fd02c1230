"""Train a draft model for speculative decoding by distilling the target on its own generations, then gate it.

Local:   llmray draft --config jobs/configs/draft/tiny_cpu.yaml model=runs/default/rl
Cluster: ray job submit --working-dir . -- python jobs/draft.py --config jobs/configs/draft/tiny_cpu.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("draft")
