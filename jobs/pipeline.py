"""The whole life of a model: corpus -> clean/dedup -> tokenizer -> pack -> pretrain -> SFT ->
reward model -> RL -> quantize -> serve, with a run report.

Local:   llmray pipeline --config jobs/configs/pipeline/default.yaml [--from sft] [--until ppo] [--keep-serving]
Cluster: ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline/default.yaml
"""

from llmray.cli import job_main

if __name__ == "__main__":
    job_main("pipeline")
