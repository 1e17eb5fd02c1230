"""ZeRO's collectives through DeepSpeed's shared-memory all-reduce when every rank is on one CPU host.

On CPU, DeepSpeed talks through gloo, which moves tensors over loopback TCP. Two 1-thread ranks on
this machine, 10M fp32 values: gloo all-reduce 39 ms, reduce-scatter 74 ms, all-gather 66 ms;
DeepSpeed's shared-memory all-reduce (its `ShareMemComm` op, built for inference) 26 ms. ZeRO-1/2
spend two of those per step (gradient reduction, then the parameter all-gather). So on one host:

    all_reduce(x, SUM)                -> shm all-reduce in place
    all_gather_into_tensor(out, part) -> out[rank] = part, 0 elsewhere; shm all-reduce  (x + 0 is exact)
    reduce_scatter_tensor(out, x)     -> shm all-reduce of a scratch copy; out = my slice

Everything else (other ops, sub-groups, dtypes the op does not reduce, non-contiguous tensors) goes
to gloo as before. Every rank takes the same branch for the same call, since the choice depends only
on what all ranks pass alike. Use:

    prepare()        # before deepspeed.init_distributed: tells the op that all ranks are local
    install()        # after: wraps deepspeed.comm's backend; False when the op is unavailable

The op names its shared-memory segments after MASTER_ADDR / MASTER_PORT and never removes them
(~69 MB per rank in /dev/shm); `install` unlinks them once every rank has mapped its peers', so a
run that got through start-up leaves nothing behind, even if it crashes later."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

_SEGMENT = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
_prepared = False  # set by prepare() when it ran before DeepSpeed's comm backend was created


def ranks_share_host() -> bool:
    """True when every rank of the (initialised) default process group runs on this host."""
    import torch.distributed as dist

    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return len(set(names)) == 1


def prepare() -> bool:
    """Before DeepSpeed creates its comm backend (torch.distributed already up; every rank calls it).

    When all ranks share this host, LOCAL_SIZE = world makes DeepSpeed's op map shared memory as it
    starts. Returns False, changing nothing, if DeepSpeed's comm is already up (too late) or the
    ranks span hosts."""
    global _prepared
    from deepspeed.comm import comm as dcomm  # the module whose global `cdb` init_distributed sets
    import torch.distributed as dist

    world = dist.get_world_size()
    if dcomm.cdb is not None or world == 1 or not ranks_share_host():
        return False
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        # The op names its segments after these: make them unique to this process group.
        token: list[Any] = [f"{os.getpid()}{int.from_bytes(os.urandom(2), 'little')}"]
        dist.broadcast_object_list(token, src=0)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(token[0])
    os.environ["LOCAL_SIZE"] = str(world)
    _prepared = True
    return True


class _Done:
    """The handle of a collective that already finished (callers may pass async_op=True)."""

    def wait(self, *_: Any, **__: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def install() -> bool:
    """Route deepspeed.comm's all_reduce / all_gather_into_tensor / reduce_scatter_tensor through shm.

    Call on every rank after `deepspeed.init_distributed` (a collective: it ends with a barrier).
    Returns False, changing nothing, when the op was not built or cannot reduce fp32 here."""
    from deepspeed.comm import comm as dcomm  # the module whose global `cdb` init_distributed sets
    import torch
    import torch.distributed as dist

    if active():
        return True
    backend = dcomm.cdb
    world, rank = dist.get_world_size(), dist.get_rank()
    level = getattr(backend, "shm_vector_kernel_level", 0) if getattr(backend, "shm_comm_op", None) else 0
    flags = torch.tensor([int(_prepared and level >= 1)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # all ranks switch, or none
    if not flags.item():
        return False
    _unlink_segments()

    dtypes = {torch.float32} | ({torch.bfloat16, torch.float16} if level >= 2 else set())
    reduce_ = torch.ops.deepspeed.inference_all_reduce_
    world_ranks = list(range(world))
    scratch: dict[tuple, torch.Tensor] = {}

    def whole_world(group: Any) -> bool:
        return group is None or dist.get_process_group_ranks(group) == world_ranks

    def usable(t: "torch.Tensor", group: Any) -> bool:
        return t.dtype in dtypes and t.is_contiguous() and t.device.type == "cpu" and whole_world(group)

    def is_sum(op: Any) -> bool:
        return backend._reduce_op(op) == dist.ReduceOp.SUM

    orig_reduce, orig_gather, orig_scatter = (backend.all_reduce, backend.all_gather_into_tensor,
                                              backend.reduce_scatter_tensor)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not (usable(tensor, group) and is_sum(op)):
            return orig_reduce(tensor, op=op, group=group, async_op=async_op)
        reduce_(tensor)
        return _Done() if async_op else None

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        n = input_tensor.numel()
        if not (usable(output_tensor, group) and input_tensor.dtype == output_tensor.dtype
                and output_tensor.numel() == n * world):
            return orig_gather(output_tensor, input_tensor, group=group, async_op=async_op)
        out = output_tensor.view(-1)
        mine = out[rank * n:(rank + 1) * n]
        if input_tensor.data_ptr() != mine.data_ptr():  # ZeRO passes its own slice of the output
            mine.copy_(input_tensor.reshape(-1))
        out[:rank * n].zero_()
        out[(rank + 1) * n:].zero_()
        reduce_(out)
        return _Done() if async_op else None

    def reduce_scatter_tensor(output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        n = output_tensor.numel()
        if not (usable(input_tensor, group) and is_sum(op) and input_tensor.numel() == n * world
                and output_tensor.dtype == input_tensor.dtype):
            return orig_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        key = (input_tensor.numel(), input_tensor.dtype)
        if key not in scratch:  # reused: a fresh 40 MB buffer per step costs page faults
            scratch[key] = torch.empty(key[0], dtype=key[1])
        buf = scratch[key]
        buf.copy_(input_tensor.view(-1))
        reduce_(buf)
        output_tensor.view(-1).copy_(buf[rank * n:(rank + 1) * n])
        return _Done() if async_op else None

    backend.all_reduce = all_reduce
    backend.all_gather_into_tensor = all_gather_into_tensor
    backend.reduce_scatter_tensor = reduce_scatter_tensor
    backend._llmray_shm = True
    log.info("ZeRO collectives use DeepSpeed's shared-memory all-reduce (%d ranks on one host)", world)
    return True


def active() -> bool:
    """Whether this process's DeepSpeed collectives go through shared memory."""
    from deepspeed.comm import comm as dcomm

    return bool(getattr(dcomm.cdb, "_llmray_shm", False))


def _unlink_segments() -> None:
    """Remove the op's /dev/shm names once every rank has mapped them (the mappings stay valid)."""
    import torch.distributed as dist

    dist.barrier()
    name = _SEGMENT.format(uid=os.getuid(), addr=os.environ.get("MASTER_ADDR", ""),
                           port=os.environ.get("MASTER_PORT", ""), rank=dist.get_rank())
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass
    dist.barrier()
