"""The collective transport's data plane without Ray: three members of a real gloo group (threads of
this process) broadcast planned buckets; every tensor arrives bit-exact with equal checksums, mixed
dtypes included; config validation names `weight_sync.transport`."""

from __future__ import annotations

import threading

import pytest
import torch

from llmray.cluster import free_port
from llmray.rl.weight_collective import WeightGroup, plan_buckets, receive_buckets, send_buckets
from llmray.rl.weight_sync import bucket_names, fused_group, resolve_transport


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(100, 64, generator=g)),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64, generator=g)),
            ("model.layers.0.self_attn.k_proj.weight", torch.randn(32, 64, generator=g)),
            ("model.layers.0.self_attn.v_proj.weight", torch.randn(32, 64, generator=g)),
            ("odd", torch.randn(3, generator=g).to(torch.bfloat16)),   # 6 bytes: the next slot must realign
            ("model.norm.weight", torch.ones(64))]


def test_plan_keeps_fused_groups_and_matches_bucket_names():
    named = named_tensors()
    plan = plan_buckets([(n, t.dtype, t.shape, t.element_size()) for n, t in named], 0.02)
    assert [[m[0] for m in b] for b in plan] == bucket_names([(n, t.numel() * t.element_size()) for n, t in named],
                                                             0.02)
    home = {m[0]: i for i, b in enumerate(plan) for m in b}
    assert len({home[n] for n, _ in named if fused_group(n).endswith("qkv_proj")}) == 1
    assert plan[2] == [["odd", "bfloat16", [3]], ["model.norm.weight", "float32", [64]]]


def test_broadcast_buckets_bit_exact_on_every_receiver():
    named = named_tensors()
    plan = plan_buckets([(n, t.dtype, t.shape, t.element_size()) for n, t in named], 0.02)
    port, out, errors = free_port("127.0.0.1"), {}, []

    def member(rank: int) -> None:
        try:
            group = WeightGroup("127.0.0.1", port, rank, 3, "gloo", 20, "test")
            if rank == 0:
                d = dict(named)
                out[0] = send_buckets(group, plan, ([(n, d[n]) for n, *_ in b] for b in plan))
            else:
                got: list = []
                out[rank] = (receive_buckets(group, plan, lambda nm: got.extend((n, t.clone()) for n, t in nm)), got)
            group.close()
        except Exception as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(out[0]) == 3
    sent = dict(named)
    for rank in (1, 2):
        reports, got = out[rank]
        assert [r["checksum"] for r in reports] == out[0]
        assert [n for n, _ in got] == [n for n, _ in named]
        assert all(t.dtype == sent[n].dtype and torch.equal(t, sent[n]) for n, t in got)


def test_transport_choice_and_config_errors():
    from llmray.config import ConfigError, load
    from llmray.rl.config import RLConfig

    assert resolve_transport("auto", gpu=True) == ("collective", "nccl")
    assert resolve_transport("auto", gpu=False) == ("collective", "gloo")
    assert resolve_transport("object_store", gpu=True) == ("object_store", "nccl")
    with pytest.raises(ConfigError, match=r"weight_sync.transport: must be auto, object_store or collective, "
                                          r"got 'nccl'"):
        load(RLConfig, None, ["weight_sync.transport=nccl"])
    with pytest.raises(ConfigError, match=r"weight_sync.bucket_mb: must be > 0"):
        load(RLConfig, None, ["weight_sync.bucket_mb=0"])
