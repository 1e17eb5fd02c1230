"""Ref role: the frozen SFT policy, inference only; gives the reference log-probs for the KL term."""

from __future__ import annotations

from llmray.rl.batch import RLBatch
from llmray.rl.dispatch import register


class RefWorker:
    def __init__(self, model_dir: str, temperature: float = 1.0, micro_batch_size: int = 32):
        import torch
        from transformers import AutoModelForCausalLM

        from llmray.device import worker_device

        torch.set_grad_enabled(False)
        self.device = worker_device()  # the GPU Ray gave this actor (ref.gpus_per_worker), or the CPU
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size

    @register("split")
    def log_probs(self, batch: RLBatch) -> RLBatch:
        import torch

        from llmray.rl.modeling import response_logprobs

        with torch.no_grad():
            parts = [response_logprobs(self.model, mb, temperature=self.temperature)
                     for mb in batch.to(self.device).chunks(self.micro_batch_size)]
        return batch.replace(ref_logprobs=torch.cat(parts, 0).cpu() if parts else torch.zeros_like(batch.response_mask))

    @register("rank0")
    def ping(self) -> int:
        import os

        return os.getpid()

