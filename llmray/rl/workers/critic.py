"""Critic role: a value model (decoder body + scalar head) trained with the clipped value loss,
a DeepSpeed engine inside a Ray actor. Initialised from the reward model (its score head) or
from the SFT model (zero head)."""

from __future__ import annotations

import os
import time

from llmray.rl.batch import RLBatch
from llmray.rl.dispatch import register


class CriticWorker:
    def __init__(self, model_dir: str, deepspeed: dict, optimizer: dict, total_steps: int = 1000, seed: int = 0):
        import torch

        from llmray.config import build
        from llmray.rl.modeling import build_value_model
        from llmray.train.deepspeed_config import DeepSpeedConfig, OptimizerConfig
        from llmray.train.engine import build_deepspeed_engine

        torch.manual_seed(seed + int(os.environ.get("RANK", "0")))
        ds = build(DeepSpeedConfig, deepspeed, "critic.deepspeed")
        model = build_value_model(model_dir)
        self.init_from = model.init_from
        self.micro_batch_size = ds.micro_batch_size
        opt = build(OptimizerConfig, optimizer, "critic.optimizer")
        self.engine = build_deepspeed_engine(model, ds, opt, total_steps)
        self.device = self.engine.device  # the role's GPU (llmray.device), or the CPU

    @register("split")
    def values(self, batch: RLBatch) -> RLBatch:
        import torch

        from llmray.rl.modeling import response_values

        self.engine.module.eval()
        with torch.no_grad():
            parts = [response_values(self.engine.module, mb)
                     for mb in batch.to(self.device).chunks(self.micro_batch_size)]
        return batch.replace(values=torch.cat(parts, 0).cpu() if parts else torch.zeros_like(batch.response_mask))

    @register("split")
    def update(self, batch: RLBatch, epochs: int, minibatch_size: int, clip_range: float | None, seed: int = 0) -> dict:
        from llmray.rl.modeling import response_values
        from llmray.rl.ppo.losses import value_loss
        from llmray.train.engine import optimizer_step

        if batch.returns is None or batch.values is None:
            raise ValueError("critic.update needs returns and values in the batch")
        start = time.monotonic()
        batch = batch.to(self.device)
        self.engine.module.train()
        sums = {"value_loss": 0.0, "value_clip_frac": 0.0}
        norms: list[float] = []
        n = 0
        rank = int(os.environ.get("RANK", "0"))
        for epoch in range(epochs):
            minibatches = batch.minibatches(minibatch_size, seed=seed * 1000 + epoch * 17 + rank)
            for mb in [m for mbatch in minibatches for m in mbatch.chunks(self.micro_batch_size)]:
                v = response_values(self.engine.module, mb)
                loss, st = value_loss(v, mb.values, mb.returns, mb.train_mask, clip_range)
                self.engine.backward(loss)
                gn = optimizer_step(self.engine)
                if gn is not None:
                    norms.append(gn)
                sums["value_loss"] += loss.item()
                sums["value_clip_frac"] += st["clip_frac"].item()
                n += 1
        out = {k: v / max(n, 1) for k, v in sums.items()}
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")  # mean over optimizer steps
        out["update_s"] = time.monotonic() - start
        return out

    @register("broadcast")
    def save_checkpoint(self, directory: str) -> str:
        return save_engine(self.engine, directory)

    @register("broadcast")
    def load_checkpoint(self, directory: str) -> str:
        return load_engine(self.engine, directory, "critic")

    @register("rank0")
    def ping(self) -> int:
        return os.getpid()


def save_engine(engine, directory: str) -> str:
    """DeepSpeed state (module, optimizer, scheduler) of one role under `directory`/state; every
    rank calls it. The RL checkpoint's completion marker is written by the controller after all roles."""
    from llmray.train.engine import barrier

    engine.save_checkpoint(directory, tag="state", save_latest=False)
    barrier()
    return os.path.join(directory, "state")


def load_engine(engine, directory: str, role: str) -> str:
    path, _ = engine.load_checkpoint(directory, tag="state", load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"no {role} state under {directory}/state")
    return path
