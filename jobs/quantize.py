"""Quantize a model artifact to W8A8-INT8 (compressed-tensors, loads in vLLM), gated on perplexity.

Local:   llmray quantize --config jobs/configs/quantize/w8a8_cpu.yaml model=artifacts/model
Cluster: ray job submit --working-dir . -- python jobs/quantize.py --config jobs/configs/quantize/w8a8_cpu.yaml
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("quantize")
