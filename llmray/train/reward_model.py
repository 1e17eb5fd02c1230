"""The reward-model training task: a scalar reward head on the SFT decoder, trained on preference pairs.

`LlamaForSequenceClassification(num_labels=1)` initialised from the SFT model; the score is read at
the last non-pad token (HF does this from `pad_token_id`; sequences are right-padded and end with
EOS). Loss: -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT's pairwise loss, with the
optional margin of Llama-2). Held-out pair accuracy is reported. The artifact is an HF directory the
RL `reward` role loads (and the `critic` may start from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmray.errors import UserError
from llmray.train.loop import TrainTask


def pairwise_loss(r_chosen, r_rejected, margin: float = 0.0):
    """Per-pair -log sigmoid(r_c - r_r - margin)."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen - r_rejected - margin)


def load_reward_model(path: str | Path):
    """(model, tokenizer) of a saved reward model, eval mode; `model(input_ids).logits[:, 0]` is the reward."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    return m.eval(), AutoTokenizer.from_pretrained(path)


@dataclass
class RewardTask(TrainTask):
    init_from: str
    margin: float = 0.0

    def build_model(self):
        import torch
        from transformers import AutoModelForSequenceClassification

        m = AutoModelForSequenceClassification.from_pretrained(self.init_from, num_labels=1, dtype=torch.float32)
        if m.config.pad_token_id is None:
            raise UserError(f"{self.init_from}: config has no pad_token_id (needed to find the last token)")
        return m

    def _rewards(self, engine, batch):
        import torch

        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        r = engine(input_ids=ids, use_cache=False).logits[:, 0].float()
        b = batch["chosen_ids"].shape[0]
        return r[:b], r[b:]

    def loss(self, engine, batch):
        rc, rr = self._rewards(engine, batch)
        losses = pairwise_loss(rc, rr, self.margin)
        sums = {"loss": float(losses.detach().sum()), "accuracy": float((rc > rr).float().sum()),
                "margin": float((rc - rr).detach().sum()), "count": float(rc.numel())}
        return losses.mean(), sums, int(batch["chosen_ids"].numel() * 2)

    def evaluate(self, engine, rows):
        from llmray.train.loop import to_batch

        return self.loss(engine, to_batch(rows, engine.device))[1]

    def export(self, state_dict, out_dir: Path) -> None:
        from llmray.models.tokenizer import load_tokenizer

        m = self.build_model()
        m.load_state_dict(state_dict, strict=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        m.save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(self.init_from).save_pretrained(out_dir)
