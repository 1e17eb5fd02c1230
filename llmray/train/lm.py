"""Causal-LM training task (pretraining and SFT): token loss on labelled positions, optional LoRA, HF export.

The loss is computed here (not by HF) as a SUM of token cross-entropies divided by the count of
labelled tokens, so a packed row's loss sum equals the sum of its conversations' sums computed alone.
Packed rows carry `position_ids` that restart at 0 for each conversation and no attention mask:
transformers then builds a block-diagonal causal mask from the position resets, so no token attends
across conversations.

Rows flagged `general` (SFT's pretraining-text mix) get their own mean: the loss is the mean over the
chat rows' labelled tokens plus `lm_coef` x the mean over the general rows' tokens, so mixed text keeps
the language model without diluting the assistant tokens' share of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmray.config import check
from llmray.train.loop import TrainTask

if TYPE_CHECKING:
    import torch

IGNORE = -100


@dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of all weights; merged into the weights on export, and
    saved unmerged in the export's `adapter/` folder (for serving by name, see docs/serving.md)."""
    r: int = 8
    alpha: int = 16
    """Scale alpha / r (the seeds: alpha = 2 x rank)."""
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", "must be >= 1")
        check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, "lora.target_modules", "must name at least one module")


def token_loss_sum(logits: "torch.Tensor", labels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(sum of next-token cross-entropies over positions with a label, number of such positions).

    `labels` are aligned with the inputs (HF convention): position t's logits predict labels[t+1].
    """
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (shift_labels != IGNORE).sum()


def apply_lora(model, lora: LoRAConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), bias="none",
                                            task_type="CAUSAL_LM"))


@dataclass
class CausalLMTask(TrainTask):
    tokenizer_dir: str
    init_from: str | None = None
    """HF model directory to start from; None = build fresh from `model`."""
    model: object = None
    """ModelConfig for a fresh model."""
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lm_coef: float = 1.0
    """Weight of the general rows' mean LM loss (rows with `general` = 1) beside the chat rows' mean."""

    def _tokenizer(self):
        from llmray.models.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def _base(self):
        import torch
        from transformers import AutoModelForCausalLM

        if self.init_from:
            return AutoModelForCausalLM.from_pretrained(self.init_from, dtype=torch.float32)
        from llmray.models.factory import build_model

        return build_model(self.model, self._tokenizer(), seed=self.seed)

    def build_model(self):
        m = self._base()
        if self.lora.enabled:
            m = apply_lora(m, self.lora)
        return m

    def loss(self, engine, batch):
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        kw = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        logits = engine(input_ids=ids, use_cache=False, **kw).logits
        if "general" not in batch:
            s, n = token_loss_sum(logits, labels)
            return s / n.clamp(min=1), {"loss": float(s.detach()), "count": float(n)}, int(ids.numel())
        general = batch["general"].bool().view(-1, 1)
        s, n = token_loss_sum(logits, labels.masked_fill(general, IGNORE))
        lm_s, lm_n = token_loss_sum(logits, labels.masked_fill(~general, IGNORE))
        lm_mean = lm_s / lm_n.clamp(min=1)
        # The loop divides every metric sum by "count" (the chat tokens): lm_loss is logged as its mean
        # weighted by each micro-batch's chat tokens.
        sums = {"loss": float(s.detach()), "count": float(n), "lm_loss": float(lm_mean.detach()) * float(n)}
        return s / n.clamp(min=1) + self.lm_coef * lm_mean, sums, int(ids.numel())

    def evaluate(self, engine, rows):
        from llmray.train.loop import to_batch

        b = to_batch(rows, engine.device)
        loss, sums, _ = self.loss(engine, b)
        return sums

    def export(self, state_dict, out_dir: Path) -> None:
        from llmray.models.factory import save_pretrained

        m = self.build_model() if self.lora.enabled else self._base()
        missing, unexpected = m.load_state_dict(state_dict, strict=False)
        bad = [k for k in missing if "lm_head" not in k] + list(unexpected)
        if bad:
            raise RuntimeError(f"export: state dict does not match the model: {bad[:5]}")
        if self.lora.enabled:
            # The unmerged adapter too (PEFT format, `adapter/`): served by name on the base model
            # with `llmray serve` lora.adapters, without a merged copy per adapter.
            m.save_pretrained(str(Path(out_dir) / "adapter"))
            m = m.merge_and_unload()
        m.config.use_cache = True
        save_pretrained(m.float(), self._tokenizer(), out_dir)
