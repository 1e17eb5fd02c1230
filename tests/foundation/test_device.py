"""llmray.device: which device a worker computes on (pure rule), and that moving to the CPU costs nothing."""

from __future__ import annotations

import time

import pytest

from llmray.device import local_gpu_index, resolve_device, to_device, worker_device


def test_ray_actor_sees_its_own_gpu_as_index_0():
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned (node GPU 5): the actor computes on cuda:0.
    assert local_gpu_index([5], "5") == 0
    assert local_gpu_index(["3", "2"], "3,2") == 0  # two GPUs: the lowest-numbered as this process sees it


def test_ray_train_worker_index_is_its_position_among_the_nodes_shared_gpus():
    # Ray Train shows each worker every GPU of the node's workers, as in ray.train.torch.get_device's doc.
    assert local_gpu_index([2], "0,1,2,3") == 2
    assert local_gpu_index([6], "4,5,6,7") == 2
    assert local_gpu_index([1], None) == 1  # no CUDA_VISIBLE_DEVICES: the node's own numbering
    with pytest.raises(ValueError, match="not in CUDA_VISIBLE_DEVICES"):
        local_gpu_index([3], "0,1")


def test_resolve_device_rule():
    assert resolve_device(False, True, None, [0], "0") == "cpu"                    # no CUDA at all
    assert resolve_device(True, True, "cuda:3", [3], "0,1,2,3") == "cuda:3"       # Ray Train's device
    assert resolve_device(True, True, None, [4], "4") == "cuda:0"                 # RL actor with num_gpus
    assert resolve_device(True, True, None, [], "") == "cpu"                      # Ray actor without GPUs
    assert resolve_device(True, False, None, [], None, local_rank=1) == "cuda:1"  # outside Ray


def test_cpu_path_moves_nothing():
    import torch

    from llmray.rl.batch import RLBatch

    assert worker_device() == torch.device("cpu")  # this machine has no CUDA
    batch = {"input_ids": torch.zeros(4, 8, dtype=torch.long), "note": "x"}
    moved = to_device(batch, worker_device())
    assert moved["input_ids"] is batch["input_ids"] and moved["note"] == "x"
    rl = RLBatch(prompt_ids=torch.ones(4, 3, dtype=torch.long), prompt_mask=torch.ones(4, 3, dtype=torch.long),
                 response_ids=torch.ones(4, 5, dtype=torch.long), response_mask=torch.ones(4, 5),
                 prompt_index=torch.arange(4), answers=["a"] * 4, rollout_logprobs=torch.zeros(4, 5))
    on = rl.to("cpu")
    assert on.response_ids is rl.response_ids and on.logprobs is None and on.answers == rl.answers
    # Nothing measurable: moving a batch to the CPU (where it is) takes well under a millisecond.
    t0 = time.perf_counter()
    for _ in range(1000):
        rl.to("cpu")
    assert (time.perf_counter() - t0) / 1000 < 1e-3


def test_to_batch_puts_columns_on_the_device():
    import numpy as np
    import torch

    from llmray.train.loop import to_batch

    b = to_batch({"input_ids": np.arange(8, dtype=np.int32).reshape(2, 4)}, torch.device("cpu"))
    assert b["input_ids"].dtype == torch.long and b["input_ids"].device.type == "cpu"
