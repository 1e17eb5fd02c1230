"""Pretrain a decoder LM on packed shards with Ray Train + DeepSpeed ZeRO.

Local:   llmray pretrain --config jobs/configs/pretrain/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain/1b_zero3.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("pretrain")
