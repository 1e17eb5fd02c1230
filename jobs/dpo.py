"""Direct preference optimisation on preference pairs with Ray Train + DeepSpeed (frozen reference, cached logprobs).

Local:   llmray dpo --config jobs/configs/dpo/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/dpo.py --config jobs/configs/dpo/tiny_cpu.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("dpo")
