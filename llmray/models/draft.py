"""Draft models for speculative decoding: build one from a target (its first layers, or fresh weights of the
same shape) and distil it on the target's own generations with plain torch (CE on the target's tokens,
optionally + KL to the target's logits). Pure torch/transformers: no Ray, no vLLM."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

log = logging.getLogger(__name__)


def build_draft(target: "LlamaForCausalLM", num_layers: int, init: Literal["target_layers", "random"],
                seed: int = 0) -> "LlamaForCausalLM":
    """A `num_layers`-layer model with the target's hidden size and vocabulary. `target_layers`: the target's
    embeddings, final norm, LM head and first `num_layers` decoder layers (layer-skip); `random`: fresh
    N(0, initializer_range) weights of the same shape (the untrained baseline)."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    from llmray.models.factory import init_weights

    if not 1 <= num_layers <= target.config.num_hidden_layers:
        raise ValueError(f"num_layers must be in [1, {target.config.num_hidden_layers}], got {num_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    torch.manual_seed(seed)
    draft = LlamaForCausalLM(config)
    if init == "random":
        init_weights(draft, config.initializer_range)
    else:
        # Every draft key exists in the target under the same name (layers 0..n-1 keep their indices).
        draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    return draft.float()


def token_batches(seqs: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                  rng: random.Random) -> "Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]":
    """Sampler of (input_ids, attention_mask, labels) batches from (tokens, n_prompt) pairs: labels are the
    tokens the target generated (prompt and padding are -100), right-padded to the batch's longest row."""
    import torch

    def sample():
        rows = rng.sample(seqs, min(batch_size, len(seqs)))
        width = max(len(t) for t, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (t, n_prompt) in enumerate(rows):
            ids[i, :len(t)] = torch.tensor(t)
            mask[i, :len(t)] = 1
            labels[i, n_prompt:len(t)] = torch.tensor(t[n_prompt:])
        return ids, mask, labels

    return sample


def distil_loss(draft_logits: "torch.Tensor", labels: "torch.Tensor", target_logits: "torch.Tensor | None",
                kl_weight: float) -> tuple["torch.Tensor", dict[str, float]]:
    """CE of the draft on the target's generated tokens (+ kl_weight x KL(target || draft) at those positions).
    Logits (B, T, V) predict token t+1 from position t; labels (B, T) with -100 where nothing is learned."""
    import torch.nn.functional as F

    logits = draft_logits[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    ce = F.cross_entropy(logits[keep], tgt[keep])
    parts = {"ce": float(ce.detach())}
    loss = ce
    if target_logits is not None and kl_weight > 0:
        p_log = F.log_softmax(target_logits[:, :-1][keep].float(), -1)
        q_log = F.log_softmax(logits[keep], -1)
        kl = F.kl_div(q_log, p_log, log_target=True, reduction="batchmean")
        parts["kl"] = float(kl.detach())
        loss = ce + kl_weight * kl
    return loss, parts


def distil(draft: "LlamaForCausalLM", target: "LlamaForCausalLM | None", seqs: list[tuple[list[int], int]],
           steps: int, batch_size: int, lr: float, kl_weight: float, pad_id: int, seed: int = 0,
           log_every: int = 20, progress: Callable[[str], None] = log.info, threads: int = 1) -> list[float]:
    """Train `draft` for `steps` AdamW steps (cosine decay) on the target's generations; returns the loss per step.
    With `target=None` (or kl_weight 0) it is plain next-token training on the labelled tokens."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(draft, target, seqs, steps, batch_size, lr, kl_weight, pad_id, seed, log_every, progress)
    finally:
        torch.set_num_threads(before)
        draft.eval()


def _train(draft, target, seqs, steps, batch_size, lr, kl_weight, pad_id, seed, log_every, progress) -> list[float]:
    import torch

    torch.manual_seed(seed)
    sample = token_batches(seqs, batch_size, pad_id, random.Random(seed))
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    use_kl = target is not None and kl_weight > 0
    if use_kl:
        target.eval()
    draft.train()
    losses = []
    for step in range(1, steps + 1):
        ids, mask, labels = sample()
        target_logits = None
        if use_kl:
            with torch.no_grad():
                target_logits = target(input_ids=ids, attention_mask=mask).logits
        loss, parts = distil_loss(draft(input_ids=ids, attention_mask=mask).logits, labels, target_logits, kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step == 1 or step % log_every == 0 or step == steps:
            progress(f"[draft] step {step}/{steps} loss {losses[-1]:.4f} "
                     + " ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    return losses


def save_draft(draft: "LlamaForCausalLM", target_dir: str | Path, out: str | Path) -> Path:
    """Write the draft as a HF directory with the target's tokenizer files (speculation needs the same vocabulary)."""
    import shutil

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out, safe_serialization=True)  # the target's dtype (float32): vLLM casts both alike
    for f in Path(target_dir).iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                            or f.name in ("chat_template.jinja", "generation_config.json")):
            shutil.copy2(f, out / f.name)
    return out
