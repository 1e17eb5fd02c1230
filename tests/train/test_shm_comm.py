"""Shared-memory collectives (llmray/train/shm_comm.py) in 2 real processes: the same results as gloo
for what ZeRO calls, gloo kept for the rest, no /dev/shm segment left behind."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]


def _rank(rank: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    import torch
    import torch.distributed as dist

    from llmray.train import shm_comm
    from llmray.train.engine import init_distributed

    torch.set_num_threads(1)
    init_distributed("gloo", shm_collectives=True)
    on = shm_comm.active()
    import deepspeed.comm as dcomm

    g = torch.Generator().manual_seed(rank)
    res: dict = {"installed": on}

    def same(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    # all_reduce over more than one 32 MB chunk of the op's buffer (9M fp32 = 36 MB)
    x = torch.randn(9_000_000, generator=g)
    ref = x.clone()
    dist.all_reduce(ref)  # torch's own call: gloo
    dcomm.all_reduce(x)
    res["all_reduce"] = same(x, ref)
    # async handle, bf16
    y = torch.randn(5000, generator=g).bfloat16()
    ref = y.clone()
    dist.all_reduce(ref)
    h = dcomm.all_reduce(y, async_op=True)
    h.wait()
    res["all_reduce_bf16"] = same(y, ref)
    # all-gather the way ZeRO does it: the input is this rank's slice of the output
    flat = torch.zeros(2 * 1001)
    flat[rank * 1001:(rank + 1) * 1001] = torch.arange(1001) + 10_000 * rank
    dcomm.all_gather_into_tensor(flat, flat[rank * 1001:(rank + 1) * 1001])
    res["all_gather_aliased"] = same(flat, torch.cat([torch.arange(1001), torch.arange(1001) + 10_000]))
    out = torch.full((2 * 7,), -1.0)
    dcomm.all_gather_into_tensor(out, torch.full((7,), float(rank + 1)))
    res["all_gather"] = same(out, torch.tensor([1.0] * 7 + [2.0] * 7))
    z = torch.randn(2 * 123_457, generator=g)
    ref = z.clone()
    dist.all_reduce(ref)
    part = torch.empty(123_457)
    dcomm.reduce_scatter_tensor(part, z)
    res["reduce_scatter"] = same(part, ref[rank * 123_457:(rank + 1) * 123_457])
    # not for the op: gloo as before
    m = torch.tensor([float(rank), 5.0 - rank])
    dcomm.all_reduce(m, op=dcomm.ReduceOp.MAX)
    res["max"] = m.tolist()
    n = torch.tensor([rank + 1], dtype=torch.int64)
    dcomm.all_reduce(n)
    res["int64_sum"] = int(n.item())
    res["segments_left"] = [f for f in os.listdir("/dev/shm") if f.endswith(f"_{port}_{rank}")]
    dist.barrier()
    Path(out_dir).joinpath(f"rank{rank}.json").write_text(json.dumps(res))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shm_collectives_match_gloo_and_leave_no_segments(tmp_path):
    port = _free_port()
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["installed"] is True, r
        assert r["all_reduce"] < 1e-5 and r["reduce_scatter"] < 1e-5, r
        assert r["all_reduce_bf16"] < 0.05, r  # bf16 rounding of a 2-term sum
        assert r["all_gather_aliased"] == 0 and r["all_gather"] == 0, r
        assert r["max"] == [1.0, 5.0] and r["int64_sum"] == 3, r
        assert r["segments_left"] == [], r
