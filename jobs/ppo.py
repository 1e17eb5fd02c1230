"""RL from an SFT policy with separate actor / critic / ref / reward / rollout (vLLM) worker groups: PPO, GRPO or RLOO.

Local:   llmray ppo --config jobs/configs/ppo/tiny_cpu.yaml
         llmray ppo --config jobs/configs/ppo/grpo_tiny_cpu.yaml algo.n_samples=8
Cluster: ray job submit --working-dir . -- python jobs/ppo.py --config jobs/configs/ppo/gpu_1b.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("ppo")
