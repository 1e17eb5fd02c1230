"""Supervised fine-tuning on chat data (loss on assistant tokens, packed, optional LoRA) with Ray Train + DeepSpeed.

Local:   llmray sft --config jobs/configs/sft/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/sft.py --config jobs/configs/sft/tiny_cpu.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("sft")
