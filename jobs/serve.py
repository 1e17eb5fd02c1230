"""Serve a model over an OpenAI-compatible HTTP API on Ray Serve (vLLM engine per replica).

Local:   llmray serve --model artifacts/model            (or --config jobs/configs/serve/tiny_cpu.yaml)
Cluster: ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve/tiny_cpu.yaml
Serve:   serve run serving/tiny_cpu.yaml                  (the same app as a Serve config; serve deploy works too)
"""
from llmray.cli import job_main

if __name__ == "__main__":
    job_main("serve")
