"""Collective weight sync over NCCL (GPU only): a sender on one GPU broadcasts a different model's
weights into a vLLM engine on another GPU through `CollectiveSync` — the code path the CPU tests run
over gloo, with backend "nccl"; greedy tokens then equal transformers' on those weights."""

from __future__ import annotations

import os
import sys

import pytest
import ray

from llmray.rl.dispatch import register

pytestmark = pytest.mark.gpu
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class GpuSender:
    """The actor's four weight-sync methods (see ActorWorker) over a plain model on this actor's GPU."""

    def __init__(self, model_dir: str):
        from llmray.models.factory import load_pretrained

        self.model = load_pretrained(model_dir)[0].cuda()
        self.group = None

    def _named(self):
        tied = self.model.config.tie_word_embeddings
        return [(n, p) for n, p in self.model.named_parameters() if not (tied and n == "lm_head.weight")]

    @register("rank0")
    def weight_plan(self, bucket_mb: float):
        from llmray.rl.weight_collective import plan_buckets

        return plan_buckets([(n, p.dtype, p.shape, p.element_size()) for n, p in self._named()], bucket_mb)

    @register("rank0")
    def weight_join(self, rank, host, port, world_size, backend, timeout_s, name) -> int:
        from llmray.rl.weight_collective import WeightGroup

        self.group = WeightGroup(host, port, rank, world_size, backend, timeout_s, name)
        return rank

    @register("broadcast")
    def weight_send(self, plan):
        from llmray.rl.weight_collective import send_buckets

        d = dict(self._named())
        return send_buckets(self.group, plan, ([(n, d[n]) for n, *_ in b] for b in plan))

    @register("broadcast")
    def weight_leave(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group = None


def test_collective_nccl_push_then_greedy_equal(ray_cluster, tiny_model_dir, other_model_dir):
    import torch

    from llmray.models.factory import load_pretrained
    from llmray.rl.weight_collective import CollectiveSync
    from llmray.rl.worker_group import WorkerGroup
    from llmray.rl.workers.rollout import RolloutWorker

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from conftest import hf_greedy  # tests/rl_infra/conftest.py

    sys.path.insert(0, os.path.dirname(__file__))
    actor = WorkerGroup("actor", GpuSender, 1, {"CPU": 1, "GPU": 1}, {"model_dir": str(other_model_dir)})
    rollout = WorkerGroup("rollout", RolloutWorker, 1, {"CPU": 1, "GPU": 1},
                          {"model_dir": str(tiny_model_dir), "dtype": "float32", "max_model_len": 128})
    try:
        m = CollectiveSync(bucket_mb=0.5, timeout_s=120, backend="nccl").push_actor(actor, rollout)
        assert m["weight_sync/buckets"] > 2
        other = load_pretrained(other_model_dir)[0]
        prompts = [[1, 5, 6, 7], [1, 40, 41]]
        assert rollout.greedy(prompts, 8) == [hf_greedy(other, p, 8, 2) for p in prompts]
    finally:
        actor.shutdown()
        rollout.shutdown()
