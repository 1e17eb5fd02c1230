"""NCCL weight sync (GPU only): an actor on one GPU broadcasts a different model's weights into a
vLLM engine on another GPU; greedy tokens then equal transformers' on those weights."""

from __future__ import annotations

import sys

import pytest
import ray

from llmray.rl.dispatch import register

pytestmark = pytest.mark.gpu
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class GpuSender:
    def __init__(self, model_dir: str):
        from llmray.models.factory import load_pretrained

        self.model = load_pretrained(model_dir)[0].cuda()
        self.comm = None

    @register("broadcast")
    def nccl_open(self, address: str, port: int, world_size: int) -> None:
        from llmray.rl.weight_sync import nccl_sender

        self.comm = nccl_sender(address, port, world_size)

    @register("rank0")
    def nccl_plan(self, bucket_mb: float):
        from llmray.rl.weight_sync import nccl_plan

        return nccl_plan(self.model.named_parameters(), bucket_mb)

    @register("broadcast")
    def nccl_send(self, bucket_mb: float) -> int:
        from llmray.rl.weight_sync import nccl_send_buckets

        return nccl_send_buckets(self.comm, self.model.named_parameters(), bucket_mb)


def test_nccl_push_then_greedy_equal(ray_cluster, tiny_model_dir, other_model_dir):
    import torch

    from llmray.models.factory import load_pretrained
    from llmray.rl.weight_sync import NcclTransport
    from llmray.rl.worker_group import WorkerGroup
    from llmray.rl.workers.rollout import RolloutWorker

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    from conftest import hf_greedy  # tests/rl_infra/conftest.py

    actor = WorkerGroup("actor", GpuSender, 1, {"CPU": 1, "GPU": 1}, {"model_dir": str(other_model_dir)})
    rollout = WorkerGroup("rollout", RolloutWorker, 1, {"CPU": 1, "GPU": 1},
                          {"model_dir": str(tiny_model_dir), "dtype": "float32", "max_model_len": 128})
    try:
        m = NcclTransport(actor, rollout).push(bucket_mb=0.5)
        assert m["weight_sync/buckets"] > 2
        other = load_pretrained(other_model_dir)[0]
        prompts = [[1, 5, 6, 7], [1, 40, 41]]
        assert rollout.greedy(prompts, 8) == [hf_greedy(other, p, 8, 2) for p in prompts]
    finally:
        actor.shutdown()
        rollout.shutdown()
