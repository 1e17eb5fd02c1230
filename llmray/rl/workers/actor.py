"""Actor role: the policy being trained, a DeepSpeed engine inside a Ray actor.

It recomputes log-probs of the rollout tokens (pi_old, and the train-inference gap against
vLLM's numbers), runs the PPO/GRPO/RLOO policy update over minibatches for several epochs, and
hands its weights to the rollout engines bucket by bucket (`weight_refs` for the object-store
transport; `weight_join`/`weight_send` for the collective one), gathering ZeRO-3 parameters one bucket
at a time.
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

    # -- weights out: sync into the rollout engines, export -----------------------------------
    def _named_params(self) -> list:
        """(name, parameter) in HF naming; a tied lm_head is left out (vLLM loads the embedding once)."""
        module = self.engine.module
        tied = getattr(module.config, "tie_word_embeddings", False)
        return [(n, p) for n, p in module.named_parameters() if not (tied and n == "lm_head.weight")]

    def _gathered_buckets(self, plan: list):
        """Per planned bucket, its full tensors on rank 0 (None on the other ranks), gathered one bucket
        at a time: at ZeRO-3 every rank takes part in each bucket's gather (a collective), so all ranks
        must iterate the whole plan, and no rank ever holds more than one bucket of gathered weights."""
        from contextlib import nullcontext

        params = dict(self._named_params())
        zero3 = self.engine.zero_optimization_partition_weights()
        rank0 = int(os.environ.get("RANK", "0")) == 0
        for bucket in plan:
            ps = [params[name] for name, *_ in bucket]
            if zero3:
                import deepspeed

                ctx = deepspeed.zero.GatheredParameters(ps, modifier_rank=None)
            else:
                ctx = nullcontext()
            with ctx:
                yield [(name, p.detach()) for (name, *_), p in zip(bucket, ps)] if rank0 else None

    @register("rank0")
    def weight_plan(self, bucket_mb: float) -> list:
        """The sync buckets' [[name, dtype, shape], ...], from the (possibly sharded) parameters' metadata."""
        from llmray.rl.weight_collective import plan_buckets

        return plan_buckets([(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape)), p.element_size())
                             for n, p in self._named_params()], bucket_mb)

    @register("broadcast")
    def weight_refs(self, bucket_mb: float = 64) -> list | None:
        """Object-store transport: the weights put in the object store as sync buckets by rank 0, one
        bucket gathered at a time (every rank takes part under ZeRO-3)."""
        import ray

        from llmray.rl.weight_sync import BucketRef, bucket_dict

        out = []
        for named in self._gathered_buckets(self.weight_plan(bucket_mb)):
            if named is not None:
                b = bucket_dict([(n, t.to("cpu", copy=True)) for n, t in named])
                out.append(BucketRef(ray.put(b), b["checksum"], b["bytes"], tuple(b["tensors"])))
        return out if int(os.environ.get("RANK", "0")) == 0 else None

    @register("rank0")
    def weight_join(self, rank: int, host: str, port: int, world_size: int, backend: str, timeout_s: float,
                    name: str) -> int:
        """Collective transport: open the weight-broadcast group as its sender (rank 0, hosting the store)."""
        from llmray.rl.weight_collective import WeightGroup

        self.weight_leave()
        self._weight_group = WeightGroup(host, port, rank, world_size, backend, timeout_s, name)
        return rank

    @register("broadcast")
    def weight_send(self, plan: list) -> list[str] | None:
        """Collective transport: broadcast every planned bucket (rank 0); checksums as sent. Every rank
        takes part in the gathers, also after a failed send, so the DeepSpeed world stays in step."""
        from llmray.rl.weight_collective import send_buckets

        buckets = self._gathered_buckets(plan)
        group = getattr(self, "_weight_group", None)
        if int(os.environ.get("RANK", "0")) != 0:
            for _ in buckets:
                pass
            return None
        try:
            if group is None:
                raise RuntimeError("actor rank 0 is in no weight-broadcast group (weight_join first)")
            return send_buckets(group, plan, buckets)
        except BaseException:
            for _ in buckets:
                pass
            self.weight_leave()
            raise

    @register("broadcast")
    def weight_leave(self) -> None:
        group, self._weight_group = getattr(self, "_weight_group", None), None
        if group is not None:
            group.close()

    @register("broadcast")
    def save_checkpoint(self, directory: str) -> str:
        from llmray.rl.workers.critic import save_engine

        return save_engine(self.engine, directory)

    @register("broadcast")
    def load_checkpoint(self, directory: str) -> str:
        from llmray.rl.workers.critic import load_engine

        return load_engine(self.engine, directory, "actor")

    @register("broadcast")
    def save_hf(self, out_dir: str, bucket_mb: float = 256) -> str | None:
        """Save the current policy as a Hugging Face dir (config, safetensors, tokenizer) from rank 0.
        Every rank takes part (ZeRO-3 gathers one bucket at a time); only rank 0 accumulates the state."""
        import shutil

        sd = {}
        for named in self._gathered_buckets(self.weight_plan(bucket_mb)):
            if named is not None:
                sd.update((n, t.to("cpu", copy=True)) for n, t in named)
        if int(os.environ.get("RANK", "0")) != 0:
            return None
        module = self.engine.module
        if getattr(module.config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in sd:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
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
