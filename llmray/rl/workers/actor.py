"""Actor role: the policy being trained, a DeepSpeed engine inside a Ray actor.

It recomputes log-probs of the rollout tokens (pi_old, and the train-inference gap against
vLLM's numbers), runs the PPO/GRPO/RLOO policy update over minibatches for several epochs, and
hands out its full weights for the sync into the rollout engines.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from llmray.rl.batch import RLBatch
from llmray.rl.dispatch import register


@dataclass(frozen=True)
class PolicyUpdate:
    """What one `update` call does; built by the controller from its config."""

    epochs: int = 1
    minibatch_size: int = 8
    """Rows per optimizer step on each actor rank (DeepSpeed micro-batches of it are accumulated)."""
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    ratio_level: str = "token"
    loss_agg: str = "token_mean"
    norm_len: int | None = None
    """Response cap for loss_agg seq_mean_token_sum_norm (rollout.max_tokens)."""
    entropy_coef: float = 0.0
    kl_loss_coef: float = 0.0
    """GRPO's KL-to-ref as a loss term (k3), when the KL is not in the reward."""
    tis_cap: float | None = None
    """Truncated importance sampling cap on pi_actor / pi_rollout; None = off."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the language-modelling loss on `ptx_ids` mixed into every minibatch."""
    temperature: float = 1.0
    seed: int = 0
    on_policy: bool = False
    """pi_old = this pass's own log-probs (detached): one epoch, one minibatch, no actor pre-pass.
    The batch's `logprobs` are then ignored; `logprob_gap` (vs the rollout engine) is returned."""


class ActorWorker:
    def __init__(self, model_dir: str, deepspeed: dict, optimizer: dict, total_steps: int = 1000, seed: int = 0,
                 temperature: float = 1.0):
        import torch
        from transformers import AutoModelForCausalLM

        from llmray.config import build
        from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig
        from llmray.train.engine import build_deepspeed_engine

        torch.manual_seed(seed + int(os.environ.get("RANK", "0")))
        ds = build(DeepSpeedConfig, deepspeed, "actor.deepspeed")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        opt = build(OptimizerConfig, optimizer, "actor.optimizer")
        self.engine = build_deepspeed_engine(model, ds, opt, total_steps)
        self.device = self.engine.device  # the role's GPU (llmray.device), or the CPU
        self.micro_batch_size = ds.micro_batch_size
        self.temperature = temperature
        self.model_dir = model_dir

    @register("split")
    def log_probs(self, batch: RLBatch) -> RLBatch:
        """Fill `logprobs` (pi_old) with the actor's own numbers for the sampled tokens."""
        import torch

        from llmray.rl.modeling import response_logprobs

        self.engine.module.eval()
        with torch.no_grad():
            parts = [response_logprobs(self.engine.module, mb, temperature=self.temperature)
                     for mb in batch.to(self.device).chunks(self.micro_batch_size)]
        # Results go back on the CPU: the batch crosses processes.
        return batch.replace(logprobs=torch.cat(parts, 0).cpu() if parts else torch.zeros_like(batch.response_mask))

    @register("split")
    def update(self, batch: RLBatch, spec: dict, ptx_ids=None) -> dict:
        """Policy-gradient epochs over shuffled minibatches; returns mean metrics of this rank."""
        import torch

        from llmray.rl.modeling import response_logprobs
        from llmray.rl.ppo.advantages import masked_mean
        from llmray.rl.ppo.kl import kl_estimate
        from llmray.rl.ppo.losses import policy_loss, tis_weights
        from llmray.train.engine import optimizer_step

        u = PolicyUpdate(**spec)
        if batch.advantages is None or (batch.logprobs is None and not u.on_policy):
            raise ValueError("actor.update needs advantages and logprobs in the batch")
        start = time.monotonic()
        batch = batch.to(self.device)
        self.engine.module.train()
        sums: dict[str, float] = {}
        norms: list[float] = []
        n = 0
        rank = int(os.environ.get("RANK", "0"))
        for epoch in range(u.epochs):
            minibatches = batch.minibatches(u.minibatch_size, seed=u.seed * 1000 + epoch * 31 + rank)
            micro = [(k, m) for k, mbatch in enumerate(minibatches) for m in mbatch.chunks(self.micro_batch_size)]
            for k, mb in micro:
                lp, ent = response_logprobs(self.engine.module, mb, with_entropy=True, temperature=u.temperature)
                mask = mb.train_mask
                if u.on_policy:
                    mb = mb.replace(logprobs=lp.detach())
                    if mb.rollout_logprobs is not None:
                        gap = masked_mean((lp.detach() - mb.rollout_logprobs).abs(), mask).item()
                        sums["logprob_gap"] = sums.get("logprob_gap", 0.0) + gap
                weights = None
                if u.tis_cap is not None and mb.rollout_logprobs is not None:
                    weights = tis_weights(mb.logprobs, mb.rollout_logprobs, u.tis_cap)
                pg_loss, st = policy_loss(lp, mb.logprobs, mb.advantages, mask, u.clip_eps, weights,
                                          clip_eps_high=u.clip_eps_high, ratio_level=u.ratio_level,
                                          loss_agg=u.loss_agg, norm_len=u.norm_len)
                entropy = masked_mean(ent, mask)
                loss = pg_loss - u.entropy_coef * entropy
                kl_loss = torch.zeros(())
                if u.kl_loss_coef > 0 and mb.ref_logprobs is not None:
                    kl_loss = masked_mean(kl_estimate(lp, mb.ref_logprobs, "k3"), mask)
                    loss = loss + u.kl_loss_coef * kl_loss
                ptx_loss = torch.zeros(())
                if u.ptx_coef > 0 and ptx_ids is not None:
                    ptx_loss = self._ptx_loss(ptx_ids, seed=epoch * 7919 + k)
                    loss = loss + u.ptx_coef * ptx_loss
                self.engine.backward(loss)
                gn = optimizer_step(self.engine)
                if gn is not None:
                    norms.append(gn)
                vals = {"policy_loss": pg_loss.item(), "entropy": entropy.item(), "clip_frac": st["clip_frac"].item(),
                        "approx_kl": st["approx_kl"].item(), "kl_loss": kl_loss.item(), "ptx_loss": ptx_loss.item()}
                if weights is not None:
                    vals["tis_weight_mean"] = masked_mean(weights, mask).item()
                for key, v in vals.items():
                    sums[key] = sums.get(key, 0.0) + v
                n += 1
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["optimizer_steps"] = float(n)
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")  # mean over optimizer steps
        out["update_s"] = time.monotonic() - start
        return out

    def _ptx_loss(self, ptx_ids, seed: int):
        """Causal-LM loss on a minibatch of pretraining/SFT sequences (pad = -100 in labels)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(ptx_ids.size(0), generator=g)[: self.micro_batch_size]
        ids = ptx_ids[idx].to(self.device)
        pad = self.engine.module.config.pad_token_id
        labels = ids.masked_fill(ids == pad, -100)
        out = self.engine.module(input_ids=ids, attention_mask=(ids != pad).long(), labels=labels, use_cache=False)
        return out.loss

    @register("broadcast")
    def weight_refs(self, bucket_mb: float = 64) -> list | None:
        """Full weights (gathered under ZeRO-3: every rank takes part) put in the object store as
        sync buckets by rank 0; the controller pushes the refs to the rollout engines."""
        from llmray.rl.weight_sync import put_buckets
        from llmray.train.engine import gather_full_state_dict

        sd = gather_full_state_dict(self.engine)
        if int(os.environ.get("RANK", "0")) != 0:
            return None
        # lm_head is tied to embed_tokens here; vLLM loads the embedding once.
        if getattr(self.engine.module.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return put_buckets(sd.items(), bucket_mb)

    @register("broadcast")
    def save_checkpoint(self, directory: str) -> str:
        from llmray.rl.workers.critic import save_engine

        return save_engine(self.engine, directory)

    @register("broadcast")
    def load_checkpoint(self, directory: str) -> str:
        from llmray.rl.workers.critic import load_engine

        return load_engine(self.engine, directory, "actor")

    @register("rank0")
    def save_hf(self, out_dir: str) -> str:
        """Save the current policy as a Hugging Face dir (config, safetensors, tokenizer)."""
        import shutil

        from llmray.train.engine import gather_full_state_dict

        sd = gather_full_state_dict(self.engine)
        self.engine.module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        for f in os.listdir(self.model_dir):
            if f.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy(os.path.join(self.model_dir, f), out_dir)
        return out_dir

    @register("rank0")
    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy continuations with transformers (one prompt at a time: no padding effects)."""
        import torch

        m = self.engine.module.eval()
        eos = m.config.eos_token_id
        out = []
        with torch.no_grad():
            for p in prompt_ids:
                ids = m.generate(torch.tensor([p], device=self.device), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=m.config.pad_token_id)
                out.append(ids[0, len(p):].tolist())
        return out

    @register("rank0")
    def ping(self) -> int:
        return os.getpid()
