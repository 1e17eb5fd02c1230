"""Evaluate a model directory or an OpenAI-compatible endpoint: held-out perplexity, task accuracy,
lm-eval tasks, served vs offline greedy accuracy.

Local:   llmray eval --config jobs/configs/eval/tiny_cpu.yaml model=runs/default/rl
Cluster: ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/eval/tiny_cpu.yaml model=...
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("eval")
