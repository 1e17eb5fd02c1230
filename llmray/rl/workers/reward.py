"""Reward role: a learned reward model, the rule-based task reward, or both combined.

The rule reward is the episode's environment reward (`llmray.rl.env`; for the task environment
`llmray.data.tasks.reward(answer, response)`: 1 right, 0.1 well-formed but wrong, 0 otherwise).
The learned one is a `LlamaForSequenceClassification(num_labels=1)` dir,
scored at the last real token of prompt + response.
"""

from __future__ import annotations

from llmray.rl.batch import RLBatch
from llmray.rl.dispatch import register


class RewardWorker:
    def __init__(self, kind: str = "rule", model_dir: str | None = None, rule_weight: float = 1.0,
                 model_weight: float = 1.0, micro_batch_size: int = 32):
        if kind not in ("rule", "model", "both"):
            raise ValueError(f"reward.kind must be rule, model or both, got {kind!r}")
        self.kind, self.rule_weight, self.model_weight = kind, rule_weight, model_weight
        self.micro_batch_size = micro_batch_size
        self.model = None
        if kind in ("model", "both"):
            import torch
            from transformers import AutoModelForSequenceClassification

            from llmray.device import worker_device

            torch.set_grad_enabled(False)
            self.device = worker_device()  # the GPU Ray gave this actor (reward.gpus_per_worker), or the CPU
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=torch.float32).eval().to(self.device)

    @register("split")
    def score(self, batch: RLBatch) -> RLBatch:
        import torch

        from llmray.data.tasks import is_correct, reward

        total = torch.zeros(len(batch))
        if self.kind in ("rule", "both"):
            # The environment's reward when the rollouts ran episodes (llmray.rl.env), else the task rule.
            rule = (batch.env_rewards if batch.env_rewards is not None
                    else torch.tensor([reward(a, t) for a, t in zip(batch.answers, batch.texts)]))
            total += self.rule_weight * rule
        if self.model is not None:
            total += self.model_weight * self._model_scores(batch)
        correct = torch.tensor([float(is_correct(a, t)) for a, t in zip(batch.answers, batch.texts)])
        return batch.replace(scores=total, correct=correct)

    def _model_scores(self, batch: RLBatch):
        import torch

        out = []
        with torch.no_grad():
            for mb in batch.to(self.device).chunks(self.micro_batch_size):
                am = mb.attention_mask
                h = self.model.model(input_ids=mb.input_ids, attention_mask=am, position_ids=mb.position_ids,
                                     use_cache=False).last_hidden_state
                logits = self.model.score(h).squeeze(-1)  # (b, L)
                # last real token: rightmost position of the attention mask
                last = am.size(1) - 1 - am.flip(-1).argmax(-1)
                out.append(logits[torch.arange(logits.size(0), device=logits.device), last])
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

    @register("rank0")
    def ping(self) -> int:
        import os

        return os.getpid()
