"""Train a reward model (scalar head, pairwise loss) on preference pairs with Ray Train + DeepSpeed.

Local:   llmray reward-model --config jobs/configs/reward_model/tiny_cpu.yaml
Cluster: ray job submit --working-dir . -- python jobs/reward_model.py --config jobs/configs/reward_model/tiny_cpu.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("reward-model")
