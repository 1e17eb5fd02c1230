"""Which device this worker computes on, and moving tensors there: the one answer for every process.

- a Ray Train worker: Ray Train's device (`ray.train.torch.get_device()`: its GPU's index among the
  node's GPUs that Ray Train shares with the other workers of the node);
- an RL role actor (or any Ray actor) given GPUs through `num_gpus` (the role's `gpus_per_worker`):
  the first GPU Ray assigned, numbered as this process sees it (Ray sets CUDA_VISIBLE_DEVICES to the
  assigned GPUs, so an actor with one GPU computes on `cuda:0`);
- a Ray worker without GPUs: the CPU, even on a GPU node;
- a process outside Ray with CUDA (a script, a test): `cuda:LOCAL_RANK`; without CUDA: the CPU.

On a machine without CUDA `worker_device()` returns the CPU before importing anything else, and
moving a CPU tensor to the CPU returns the tensor itself: the CPU path costs nothing measurable.
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch


def local_gpu_index(assigned: Sequence[int | str], visible: str | None) -> int:
    """This process's CUDA index of the lowest-numbered GPU Ray assigned to it.

    `assigned`: `ray.get_gpu_ids()` (node-level ids); `visible`: CUDA_VISIBLE_DEVICES. Ray sets it to
    the assigned ids for a plain actor (index 0) and Ray Train to every GPU of the node's workers
    (index = position of ours in that list); unset, CUDA numbers the node's GPUs, so the id itself."""
    if not assigned:
        raise ValueError("no GPU assigned")
    ids = [str(a).strip() for a in assigned]
    if not visible:
        return min(int(a) for a in ids)
    order = [v.strip() for v in visible.split(",") if v.strip()]
    missing = [a for a in ids if a not in order]
    if missing:
        raise ValueError(f"assigned GPU(s) {missing} are not in CUDA_VISIBLE_DEVICES={visible!r}")
    return min(order.index(a) for a in ids)


def resolve_device(has_cuda: bool, in_ray: bool, train_device: str | None, gpu_ids: Sequence[int | str],
                   visible: str | None, local_rank: int = 0) -> str:
    """The rule of this module as a pure function of the facts `worker_device` gathers."""
    if not has_cuda:
        return "cpu"
    if train_device is not None:
        return train_device
    if in_ray:
        return f"cuda:{local_gpu_index(gpu_ids, visible)}" if gpu_ids else "cpu"
    return f"cuda:{local_rank}"


@cache
def worker_device() -> "torch.device":
    """The device this process computes on (see the module docstring). Cached: it does not change."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray

    in_ray = ray.is_initialized()
    train_device = None
    if in_ray:
        import ray.train

        try:
            ray.train.get_context()
        except RuntimeError:  # not inside a Ray Train training function
            pass
        else:
            import ray.train.torch

            train_device = str(ray.train.torch.get_device())
    gpu_ids = ray.get_gpu_ids() if in_ray else []
    return torch.device(resolve_device(True, in_ray, train_device, gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                       int(os.environ.get("LOCAL_RANK", "0"))))


def to_device(batch: dict[str, Any], device: "torch.device | str") -> dict[str, Any]:
    """The dict's tensors on `device` (others unchanged). `Tensor.to` returns the tensor itself when it is
    already there, so on the CPU this is a loop over a few keys."""
    return {k: (v.to(device) if hasattr(v, "to") and hasattr(v, "device") else v) for k, v in batch.items()}
